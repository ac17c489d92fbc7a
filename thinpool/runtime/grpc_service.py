"""containerd's snapshots service (``containerd.services.snapshots.v1.Snapshots``) over gRPC, for
a snapshotter object: what a containerd proxy snapshotter plugin dials.

:func:`serve` starts a ``grpc.Server`` on ``unix:PATH`` whose ten methods call the snapshotter's
``prepare``, ``view``, ``mounts``, ``commit``, ``remove``, ``stat``, ``update``, ``walk``,
``usage`` and ``cleanup`` (the interface ``thinpool.runtime`` snapshotters have: plain data of
types.py in and out, thinpool's errors raised) and converts field by field:

* Info: name, parent, kind (the protocol's numbers are :class:`~.types.Kind`'s), labels, and
  ``created_at``/``updated_at`` as Timestamps of the float seconds (a zero or missing Timestamp
  in a request is 0.0: containerd sends zero times with Update; they are not changes).
* Mount: type, source, target, options. Usage: size and inodes.
* ``snapshotter`` in every request is the plugin's name in containerd: ignored.
* Update passes ``update_mask.paths`` as the field paths (None when there are none: replace
  every label). List streams the snapshotter's infos in responses of at most
  :data:`LIST_BATCH` infos each (none at all for no snapshot), as containerd's own service does.

Errors become status codes containerd turns back into its error types: NotFound NOT_FOUND,
AlreadyExists ALREADY_EXISTS, BusyError (in use, has children) and NoSpace FAILED_PRECONDITION,
InvalidArgument INVALID_ARGUMENT, any other ThinpoolError UNKNOWN with its message; an
unexpected exception is INTERNAL, its message ``TYPE: text``, and is logged with its traceback on
the ``thinpool.runtime.grpc`` logger. Nothing is printed.

Concurrency: the server runs up to ``max_workers`` calls at once, each on a thread of its own,
and takes no lock: the snapshotter must be safe to call from several threads (thinpool's has a
lock of its own). Calls are not ordered across connections.

:func:`generic_handler` is the same service as a handler for a ``grpc.Server`` made elsewhere;
:func:`status_of` is the error mapping; the ``*_to_proto`` / ``*_from_proto`` functions are the
conversions.

Importing this module without grpcio or protobuf raises
:class:`~thinpool.errors.MissingDependency` naming ``pip install 'thinpool[runtime]'``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Protocol

from ..errors import (AlreadyExists, BusyError, InvalidArgument, MissingDependency, NoSpace,
                      NotFound, ThinpoolError)
from ..export.state import check_socket_path, clear_stale_socket
from . import proto
from .types import Info, Kind, Mount, Usage

try:
    import grpc
except ImportError:
    raise MissingDependency("containerd's gRPC service needs grpcio: "
                            "pip install 'thinpool[runtime]'", "grpcio") from None

log = logging.getLogger("thinpool.runtime.grpc")

LIST_BATCH = 100        # infos in one ListSnapshotsResponse


class Snapshotter(Protocol):
    """What the service calls; every method raises thinpool's errors."""

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None
                ) -> list[Mount]: ...
    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None
             ) -> list[Mount]: ...
    def mounts(self, key: str) -> list[Mount]: ...
    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None: ...
    def remove(self, key: str) -> None: ...
    def stat(self, key: str) -> Info: ...
    def update(self, info: Info, fieldpaths: list[str] | None = None) -> Info: ...
    def walk(self, filters: list[str] | None = None) -> list[Info]: ...
    def usage(self, key: str) -> Usage: ...
    def cleanup(self) -> None: ...


# -- conversions -----------------------------------------------------------------------------------
def timestamp_of(seconds: float):
    """A protobuf Timestamp of ``seconds`` since the epoch (to the nanosecond a float holds)."""
    secs = math.floor(seconds)
    nanos = round((seconds - secs) * 1e9)       # the fraction is exact; times 1e9 is not
    if nanos == 1_000_000_000:
        secs, nanos = secs + 1, 0
    return proto.Timestamp(seconds=secs, nanos=nanos)


def seconds_of(ts) -> float:
    """The float seconds of a protobuf Timestamp; 0.0 for a zero one."""
    return ts.seconds + ts.nanos / 1e9


def info_to_proto(info: Info):
    """The protocol's Info of ``info`` (Timestamps of its float times)."""
    return proto.Info(name=info.name, parent=info.parent, kind=int(info.kind),
                      labels=info.labels, created_at=timestamp_of(info.created_at),
                      updated_at=timestamp_of(info.updated_at))


def info_from_proto(msg) -> Info:
    """The Info of a protocol Info; a kind not in :class:`Kind` is InvalidArgument."""
    try:
        kind = Kind(msg.kind)
    except ValueError:
        raise InvalidArgument(f"snapshot {msg.name!r}: unknown kind {msg.kind}") from None
    return Info(name=msg.name, kind=kind, parent=msg.parent, labels=dict(msg.labels),
                created_at=seconds_of(msg.created_at), updated_at=seconds_of(msg.updated_at))


def mount_to_proto(mount: Mount):
    """The protocol's Mount of ``mount``."""
    return proto.Mount(type=mount.type, source=mount.source, target=mount.target,
                       options=list(mount.options))


def mount_from_proto(msg) -> Mount:
    """The Mount of a protocol Mount."""
    return Mount(type=msg.type, source=msg.source, options=list(msg.options), target=msg.target)


def usage_to_proto(usage: Usage):
    """The UsageResponse of ``usage`` (its size and inodes; the block count is thinpool's own)."""
    return proto.UsageResponse(size=usage.size, inodes=usage.inodes)


# -- the methods ---------------------------------------------------------------------------------
def _methods(sn: Snapshotter) -> dict[str, Callable]:
    """Method name -> function of the request message to the response (an iterator of them
    for List)."""

    def mounts_of(response: type, mounts: list[Mount]):
        return response(mounts=[mount_to_proto(m) for m in mounts])

    def list_(req) -> Iterator:
        infos = sn.walk(list(req.filters) or None)
        for i in range(0, len(infos), LIST_BATCH):
            yield proto.ListSnapshotsResponse(
                info=[info_to_proto(x) for x in infos[i:i + LIST_BATCH]])

    def update(req):
        info = sn.update(info_from_proto(req.info), list(req.update_mask.paths) or None)
        return proto.UpdateSnapshotResponse(info=info_to_proto(info))

    def empty(_result) -> object:
        return proto.Empty()

    return {
        "Prepare": lambda r: mounts_of(proto.PrepareSnapshotResponse,
                                       sn.prepare(r.key, r.parent, dict(r.labels))),
        "View": lambda r: mounts_of(proto.ViewSnapshotResponse,
                                    sn.view(r.key, r.parent, dict(r.labels))),
        "Mounts": lambda r: mounts_of(proto.MountsResponse, sn.mounts(r.key)),
        "Commit": lambda r: empty(sn.commit(r.name, r.key, dict(r.labels))),
        "Remove": lambda r: empty(sn.remove(r.key)),
        "Stat": lambda r: proto.StatSnapshotResponse(info=info_to_proto(sn.stat(r.key))),
        "Update": update,
        "List": list_,
        "Usage": lambda r: usage_to_proto(sn.usage(r.key)),
        "Cleanup": lambda r: empty(sn.cleanup()),
    }


# -- errors --------------------------------------------------------------------------------------
def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message an exception from the snapshotter is answered with."""
    if isinstance(e, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(e)
    if isinstance(e, (BusyError, NoSpace)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, ThinpoolError):
        return grpc.StatusCode.UNKNOWN, str(e)
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


def _failed(name: str, e: Exception, context) -> None:
    """Answer the call with ``e``'s status (``context.abort`` raises)."""
    code, message = status_of(e)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed unexpectedly", name, exc_info=e)
    else:
        log.debug("%s: %s: %s", name, code.name, message)
    context.abort(code, message)


def _unary(name: str, fn: Callable) -> Callable:
    def handler(request, context):
        try:
            return fn(request)
        except Exception as e:
            _failed(name, e, context)
    return handler


def _stream(name: str, fn: Callable) -> Callable:
    def handler(request, context):
        try:
            responses = list(fn(request))
        except Exception as e:
            _failed(name, e, context)
        yield from responses
    return handler


def generic_handler(snapshotter: Snapshotter) -> grpc.GenericRpcHandler:
    """The service's handler for ``snapshotter``, to add to any ``grpc.Server``."""
    handlers = {}
    for name, fn in _methods(snapshotter).items():
        method = proto.METHODS[name]
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        wrap = _stream if method.server_streaming else _unary
        handlers[name] = make(wrap(name, fn), request_deserializer=method.request.FromString,
                              response_serializer=method.response.SerializeToString)
    return grpc.method_handlers_generic_handler(proto.SERVICE, handlers)


def serve(snapshotter: Snapshotter, socket_path, *, max_workers: int = 8) -> grpc.Server:
    """Start the service for ``snapshotter`` on the Unix socket ``socket_path`` and return the
    running server (stop it with ``server.stop(grace)``; the socket file goes with it).

    A socket file a dead process left at the path is removed first; a live one is refused with
    BusyError, any other file, a path too long for a socket or ``max_workers`` below 1 with
    InvalidArgument, a missing directory with NotFound; a bind that fails otherwise is a
    ThinpoolError."""
    from concurrent import futures
    if max_workers < 1:
        raise InvalidArgument(f"max_workers must be at least 1, not {max_workers}")
    path = check_socket_path(os.path.abspath(os.fspath(socket_path)))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise NotFound(f"cannot listen on {path}: directory {directory} does not exist")
    clear_stale_socket(path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="thinpool-grpc"))
    server.add_generic_rpc_handlers((generic_handler(snapshotter),))
    try:
        bound = server.add_insecure_port(f"unix:{path}")     # older grpcio: 0 for a failure
    except RuntimeError as e:
        bound, why = 0, f": {e}"
    else:
        why = ""
    if not bound:
        server.stop(None)
        raise ThinpoolError(f"cannot listen on {path}{why}")
    server.start()
    log.info("containerd snapshots service listening on unix:%s", path)
    return server

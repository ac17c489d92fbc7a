"""containerd's snapshots protocol as protobuf message classes, built at import time.

No generated code and no protoc: the two files containerd's proxy snapshotters speak,
``containerd/types/mount.proto`` (package ``containerd.types``) and
``containerd/services/snapshots/v1/snapshots.proto`` (package
``containerd.services.snapshots.v1``), are declared once below as data (:data:`FILES`: each
message a list of ``(name, number, type)`` fields), turned into
``descriptor_pb2.FileDescriptorProto`` s, added with the well-known types they import (Empty,
Timestamp, FieldMask) to a private ``DescriptorPool`` (so nothing clashes with the default pool)
and made into classes with ``message_factory.GetMessageClass``.

Field types in the table: ``string``, ``int64``, ``repeated T``, ``map<string,string>`` (a
repeated nested ``XxxEntry`` message with ``map_entry`` set, as protoc makes it), an enum of the
same file by its name, or a message by its full name with a leading dot (``.containerd.types.Mount``)
or by its name within the same package.

Exposed: one class per message under its protocol name (:data:`PrepareSnapshotRequest`,
:data:`Info`, :data:`Mount`, :data:`Empty`, :data:`Timestamp`, ...; the Kind enum's numbers are
:class:`thinpool.runtime.types.Kind`'s), :data:`SERVICE` (the service's full name),
:data:`METHODS` (every method: its full path ``/containerd.services.snapshots.v1.Snapshots/NAME``,
request and response class, whether the response is a stream) and :data:`POOL` (the pool).

Importing this module without the protobuf package raises
:class:`~thinpool.errors.MissingDependency`; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MissingDependency

try:
    from google.protobuf import (descriptor_pb2, descriptor_pool, empty_pb2, field_mask_pb2,
                                 message_factory, timestamp_pb2)
except ImportError:
    raise MissingDependency("containerd's gRPC service needs protobuf and grpcio: "
                            "pip install 'thinpool[runtime]'", "protobuf") from None

# -- the schema ----------------------------------------------------------------------------------
LABELS = "map<string,string>"
_KEY_REQUEST = [("snapshotter", 1, "string"), ("key", 2, "string")]
_PREPARE_REQUEST = [*_KEY_REQUEST, ("parent", 3, "string"), ("labels", 4, LABELS)]
_MOUNTS_RESPONSE = [("mounts", 1, "repeated .containerd.types.Mount")]
_INFO_RESPONSE = [("info", 1, "Info")]

MOUNT_FILE = "containerd/types/mount.proto"
SNAPSHOTS_FILE = "containerd/services/snapshots/v1/snapshots.proto"
SERVICE_NAME = "Snapshots"

# name -> (package, imports, enums {name: [value names, numbered from 0]}, messages {name: fields})
FILES: dict[str, tuple[str, list[str], dict[str, list[str]], dict[str, list[tuple]]]] = {
    MOUNT_FILE: ("containerd.types", [], {}, {
        "Mount": [("type", 1, "string"), ("source", 2, "string"), ("target", 3, "string"),
                  ("options", 4, "repeated string")],
    }),
    SNAPSHOTS_FILE: ("containerd.services.snapshots.v1", [
        "google/protobuf/empty.proto", "google/protobuf/field_mask.proto",
        "google/protobuf/timestamp.proto", MOUNT_FILE,
    ], {
        "Kind": ["UNKNOWN", "VIEW", "ACTIVE", "COMMITTED"],
    }, {
        "PrepareSnapshotRequest": _PREPARE_REQUEST,
        "PrepareSnapshotResponse": _MOUNTS_RESPONSE,
        "ViewSnapshotRequest": _PREPARE_REQUEST,
        "ViewSnapshotResponse": _MOUNTS_RESPONSE,
        "MountsRequest": _KEY_REQUEST,
        "MountsResponse": _MOUNTS_RESPONSE,
        "RemoveSnapshotRequest": _KEY_REQUEST,
        "CommitSnapshotRequest": [("snapshotter", 1, "string"), ("name", 2, "string"),
                                  ("key", 3, "string"), ("labels", 4, LABELS)],
        "StatSnapshotRequest": _KEY_REQUEST,
        "Info": [("name", 1, "string"), ("parent", 2, "string"), ("kind", 3, "Kind"),
                 ("created_at", 4, ".google.protobuf.Timestamp"),
                 ("updated_at", 5, ".google.protobuf.Timestamp"), ("labels", 6, LABELS)],
        "StatSnapshotResponse": _INFO_RESPONSE,
        "UpdateSnapshotRequest": [("snapshotter", 1, "string"), ("info", 2, "Info"),
                                  ("update_mask", 3, ".google.protobuf.FieldMask")],
        "UpdateSnapshotResponse": _INFO_RESPONSE,
        "ListSnapshotsRequest": [("snapshotter", 1, "string"), ("filters", 2, "repeated string")],
        "ListSnapshotsResponse": [("info", 1, "repeated Info")],
        "UsageRequest": _KEY_REQUEST,
        "UsageResponse": [("size", 1, "int64"), ("inodes", 2, "int64")],
        "CleanupRequest": [("snapshotter", 1, "string")],
    }),
}

# method name -> (request, response, server streaming); the service lives in SNAPSHOTS_FILE
_EMPTY = ".google.protobuf.Empty"
SERVICE_METHODS: dict[str, tuple[str, str, bool]] = {
    "Prepare": ("PrepareSnapshotRequest", "PrepareSnapshotResponse", False),
    "View": ("ViewSnapshotRequest", "ViewSnapshotResponse", False),
    "Mounts": ("MountsRequest", "MountsResponse", False),
    "Commit": ("CommitSnapshotRequest", _EMPTY, False),
    "Remove": ("RemoveSnapshotRequest", _EMPTY, False),
    "Stat": ("StatSnapshotRequest", "StatSnapshotResponse", False),
    "Update": ("UpdateSnapshotRequest", "UpdateSnapshotResponse", False),
    "List": ("ListSnapshotsRequest", "ListSnapshotsResponse", True),
    "Usage": ("UsageRequest", "UsageResponse", False),
    "Cleanup": ("CleanupRequest", _EMPTY, False),
}

# -- from the schema to descriptors ----------------------------------------------------------------
_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"string": _F.TYPE_STRING, "int64": _F.TYPE_INT64}


def _full(package: str, name: str) -> str:
    return name if name.startswith(".") else f".{package}.{name}"


def _message(package: str, enums: dict, name: str, fields: list[tuple]
             ) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype in fields:
        field = msg.field.add(name=fname, number=number, label=_F.LABEL_OPTIONAL)
        if ftype == LABELS:
            entry = msg.nested_type.add(name="".join(p.capitalize() for p in fname.split("_"))
                                        + "Entry")
            entry.options.map_entry = True
            for i, part in enumerate(("key", "value"), 1):
                entry.field.add(name=part, number=i, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
            field.label = _F.LABEL_REPEATED
            field.type = _F.TYPE_MESSAGE
            field.type_name = f".{package}.{name}.{entry.name}"
            continue
        if ftype.startswith("repeated "):
            field.label = _F.LABEL_REPEATED
            ftype = ftype.removeprefix("repeated ")
        if ftype in _SCALARS:
            field.type = _SCALARS[ftype]
        elif ftype in enums:
            field.type = _F.TYPE_ENUM
            field.type_name = _full(package, ftype)
        else:
            field.type = _F.TYPE_MESSAGE
            field.type_name = _full(package, ftype)
    return msg


def file_descriptor(name: str) -> descriptor_pb2.FileDescriptorProto:
    """The ``FileDescriptorProto`` of ``name`` (a key of :data:`FILES`), built from the table."""
    package, imports, enums, messages = FILES[name]
    fd = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3",
                                            dependency=imports)
    for ename, values in enums.items():
        enum = fd.enum_type.add(name=ename)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for mname, fields in messages.items():
        fd.message_type.append(_message(package, enums, mname, fields))
    if name == SNAPSHOTS_FILE:
        service = fd.service.add(name=SERVICE_NAME)
        for method, (req, resp, stream) in SERVICE_METHODS.items():
            service.method.add(name=method, input_type=_full(package, req),
                               output_type=_full(package, resp), server_streaming=stream)
    return fd


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for module in (empty_pb2, timestamp_pb2, field_mask_pb2):
        fd = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fd)
        pool.Add(fd)
    for name in FILES:
        pool.Add(file_descriptor(name))
    return pool


POOL = _build_pool()


def message_class(full_name: str) -> type:
    """The class of message ``full_name`` (``containerd.types.Mount``) in :data:`POOL`."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name.lstrip(".")))


_PKG = FILES[SNAPSHOTS_FILE][0]
SERVICE = f"{_PKG}.{SERVICE_NAME}"

Mount = message_class("containerd.types.Mount")
Empty = message_class("google.protobuf.Empty")
Timestamp = message_class("google.protobuf.Timestamp")
FieldMask = message_class("google.protobuf.FieldMask")
PrepareSnapshotRequest = message_class(f"{_PKG}.PrepareSnapshotRequest")
PrepareSnapshotResponse = message_class(f"{_PKG}.PrepareSnapshotResponse")
ViewSnapshotRequest = message_class(f"{_PKG}.ViewSnapshotRequest")
ViewSnapshotResponse = message_class(f"{_PKG}.ViewSnapshotResponse")
MountsRequest = message_class(f"{_PKG}.MountsRequest")
MountsResponse = message_class(f"{_PKG}.MountsResponse")
RemoveSnapshotRequest = message_class(f"{_PKG}.RemoveSnapshotRequest")
CommitSnapshotRequest = message_class(f"{_PKG}.CommitSnapshotRequest")
StatSnapshotRequest = message_class(f"{_PKG}.StatSnapshotRequest")
Info = message_class(f"{_PKG}.Info")
StatSnapshotResponse = message_class(f"{_PKG}.StatSnapshotResponse")
UpdateSnapshotRequest = message_class(f"{_PKG}.UpdateSnapshotRequest")
UpdateSnapshotResponse = message_class(f"{_PKG}.UpdateSnapshotResponse")
ListSnapshotsRequest = message_class(f"{_PKG}.ListSnapshotsRequest")
ListSnapshotsResponse = message_class(f"{_PKG}.ListSnapshotsResponse")
UsageRequest = message_class(f"{_PKG}.UsageRequest")
UsageResponse = message_class(f"{_PKG}.UsageResponse")
CleanupRequest = message_class(f"{_PKG}.CleanupRequest")


@dataclass(frozen=True)
class Method:
    """One method of the service: ``path`` is what a gRPC client calls
    (``/containerd.services.snapshots.v1.Snapshots/Prepare``)."""

    name: str
    path: str
    request: type
    response: type
    server_streaming: bool


METHODS: dict[str, Method] = {
    name: Method(name, f"/{SERVICE}/{name}", message_class(_full(_PKG, req)),
                 message_class(_full(_PKG, resp)), stream)
    for name, (req, resp, stream) in SERVICE_METHODS.items()
}

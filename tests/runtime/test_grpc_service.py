"""containerd's snapshots service over a real gRPC channel on a Unix socket, in front of an
in-memory model snapshotter (a dict of infos that keeps containerd's rules): every method, every
error code, List's batches, Update's field masks, Timestamps, raw wire bytes in and out, the
socket path's checks, and calls running at once."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from thinpool.errors import (AlreadyExists, BusyError, DeviceIOError, InvalidArgument,
                             NoDataSpace, NotFound, ThinpoolError)
from thinpool.runtime.types import Info, Kind, Mount, Usage

try:
    import grpc

    from thinpool.runtime import grpc_service, proto
    MISSING = None
except ImportError as e:          # MissingDependency from the modules, or grpc itself
    MISSING = str(e)

pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"runtime extra: {MISSING}")

T0 = 1700000000.5                 # the model's clock starts here, a second a call


# -- the model ------------------------------------------------------------------------------------
class ModelSnapshotter:
    """containerd's snapshotter rules over a dict: keys are unique across kinds; a parent must be
    committed; only an active snapshot commits (its key goes, the name appears); a snapshot with
    children is not removed; Update changes labels only. ``calls`` records every call's
    arguments; ``hooks[method]`` runs first (to raise, or to wait)."""

    def __init__(self):
        self.infos: dict[str, Info] = {}
        self.usages: dict[str, Usage] = {}
        self.calls: list[tuple] = []
        self.hooks: dict[str, object] = {}
        self.cleanups = 0
        self.now = T0
        self.lock = threading.Lock()

    def _enter(self, method: str, *args) -> None:
        hook = self.hooks.get(method)
        if hook is not None:
            hook()
        with self.lock:
            self.calls.append((method, *args))

    def _tick(self) -> float:
        self.now += 1.0
        return self.now

    def _get(self, key: str) -> Info:
        if key not in self.infos:
            raise NotFound(f"snapshot {key} does not exist")
        return self.infos[key]

    def _mounts(self, info: Info) -> list[Mount]:
        mode = "ro" if info.kind is Kind.VIEW else "rw"
        return [Mount("bind", f"/model/{info.name}", ["rbind", mode])]

    def _create(self, kind: Kind, key: str, parent: str, labels) -> list[Mount]:
        with self.lock:
            if not key:
                raise InvalidArgument("a snapshot key must not be empty")
            if key in self.infos:
                raise AlreadyExists(f"snapshot {key} already exists")
            if parent and self._get(parent).kind is not Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent} is not a committed snapshot")
            t = self._tick()
            info = self.infos[key] = Info(key, kind, parent, dict(labels or {}), t, t)
            return self._mounts(info)

    def prepare(self, key, parent="", labels=None):
        self._enter("prepare", key, parent, labels)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key, parent="", labels=None):
        self._enter("view", key, parent, labels)
        return self._create(Kind.VIEW, key, parent, labels)

    def mounts(self, key):
        self._enter("mounts", key)
        with self.lock:
            info = self._get(key)
            if info.kind is Kind.COMMITTED:
                raise BusyError(f"snapshot {key} is committed: it has no mounts")
            return self._mounts(info)

    def commit(self, name, key, labels=None):
        self._enter("commit", name, key, labels)
        with self.lock:
            info = self._get(key)
            if info.kind is not Kind.ACTIVE:
                raise BusyError(f"snapshot {key} is not active")
            if name in self.infos:
                raise AlreadyExists(f"snapshot {name} already exists")
            del self.infos[key]
            t = self._tick()
            self.infos[name] = Info(name, Kind.COMMITTED, info.parent, dict(labels or {}), t, t)

    def remove(self, key):
        self._enter("remove", key)
        with self.lock:
            self._get(key)
            if any(i.parent == key for i in self.infos.values()):
                raise BusyError(f"snapshot {key} has children")
            del self.infos[key]

    def stat(self, key):
        self._enter("stat", key)
        with self.lock:
            return _copy(self._get(key))

    def update(self, info, fieldpaths=None):
        self._enter("update", _copy(info), fieldpaths)
        with self.lock:
            cur = self._get(info.name)
            labels = dict(cur.labels)
            for path in fieldpaths or ["labels"]:
                if path == "labels":
                    labels = dict(info.labels)
                elif path.startswith("labels."):
                    k = path.removeprefix("labels.")
                    if k in info.labels:
                        labels[k] = info.labels[k]
                    else:
                        labels.pop(k, None)
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of a snapshot")
            cur.labels = labels
            cur.updated_at = self._tick()
            return _copy(cur)

    def walk(self, filters=None):
        self._enter("walk", filters)
        with self.lock:
            infos = sorted(self.infos.values(), key=lambda i: i.name)
            if filters:             # containerd's: filters OR'd, "a==x,b==y" AND'd; a subset
                def match(info, flt):
                    for cond in flt.split(","):
                        fieldname, sep, value = cond.partition("==")
                        if not sep or fieldname not in ("name", "parent", "kind"):
                            raise InvalidArgument(f"unsupported filter {flt!r}")
                        got = info.kind.label if fieldname == "kind" else getattr(info, fieldname)
                        if got != value:
                            return False
                    return True
                infos = [i for i in infos if any(match(i, f) for f in filters)]
            return [_copy(i) for i in infos]

    def usage(self, key):
        self._enter("usage", key)
        with self.lock:
            self._get(key)
            return self.usages.get(key, Usage(size=4096, inodes=1, blocks=1))

    def cleanup(self):
        self._enter("cleanup")
        with self.lock:
            self.cleanups += 1


def _copy(info: Info) -> Info:
    return Info(info.name, info.kind, info.parent, dict(info.labels), info.created_at,
                info.updated_at)


# -- the client -----------------------------------------------------------------------------------
class Client:
    """One callable per method: ``client.Prepare(key=..., parent=...)`` sends the request made of
    those fields (snapshotter="thinpool" unless given) and returns the response (a list of
    responses for List)."""

    def __init__(self, path: str):
        self.channel = grpc.insecure_channel(f"unix:{path}")
        for name, m in proto.METHODS.items():
            make = self.channel.unary_stream if m.server_streaming else self.channel.unary_unary
            setattr(self, "_" + name, make(m.path, request_serializer=m.request.SerializeToString,
                                           response_deserializer=m.response.FromString))

    def __getattr__(self, name):
        call = self.__dict__["_" + name]
        request = proto.METHODS[name].request

        def send(msg=None, **fields):
            if msg is None:
                fields.setdefault("snapshotter", "thinpool")
                msg = request(**fields)
            result = call(msg, timeout=20)
            return list(result) if proto.METHODS[name].server_streaming else result
        return send

    def raw(self, name: str, data: bytes) -> bytes:
        """Send ``data`` as the request's bytes, return the response's bytes."""
        return self.channel.unary_unary(proto.METHODS[name].path)(data, timeout=20)


@contextmanager
def running(tmp_path, model=None, **kw):
    model = model or ModelSnapshotter()
    path = str(tmp_path / "tp.sock")
    server = grpc_service.serve(model, path, **kw)
    client = Client(path)
    try:
        yield model, client
    finally:
        client.channel.close()
        server.stop(None).wait(10)
    assert not os.path.exists(path)         # the socket goes with the server


def error_of(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def mounts(resp) -> list[tuple]:
    return [(m.type, m.source, m.target, list(m.options)) for m in resp.mounts]


def seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


# -- every method ---------------------------------------------------------------------------------
def test_a_layer_and_a_container(tmp_path):
    """What containerd does to unpack one layer and run a container on it."""
    with running(tmp_path) as (model, c):
        r = c.Prepare(key="ns/1/extract", labels={"containerd.io/snapshot.ref": "sha256:aa"})
        assert mounts(r) == [("bind", "/model/ns/1/extract", "", ["rbind", "rw"])]
        assert model.calls[-1] == ("prepare", "ns/1/extract", "",
                                   {"containerd.io/snapshot.ref": "sha256:aa"})
        assert isinstance(c.Commit(name="ns/2/sha256:aa", key="ns/1/extract",
                                   labels={"l": "1"}), proto.Empty)
        info = c.Stat(key="ns/2/sha256:aa").info
        assert (info.name, info.parent, info.kind, dict(info.labels)) == \
            ("ns/2/sha256:aa", "", Kind.COMMITTED, {"l": "1"})
        assert seconds(info.created_at) == seconds(info.updated_at) == T0 + 2

        r = c.Prepare(key="ns/3/ctr", parent="ns/2/sha256:aa")
        assert mounts(r) == [("bind", "/model/ns/3/ctr", "", ["rbind", "rw"])]
        assert mounts(c.Mounts(key="ns/3/ctr")) == mounts(r)
        r = c.View(key="ns/4/view", parent="ns/2/sha256:aa", labels={"v": "w"})
        assert mounts(r) == [("bind", "/model/ns/4/view", "", ["rbind", "ro"])]
        assert model.calls[-1] == ("view", "ns/4/view", "ns/2/sha256:aa", {"v": "w"})
        assert c.Stat(key="ns/4/view").info.kind == Kind.VIEW
        assert c.Stat(key="ns/3/ctr").info.parent == "ns/2/sha256:aa"

        model.usages["ns/3/ctr"] = Usage(size=5 * 2**40, inodes=123, blocks=99)
        u = c.Usage(key="ns/3/ctr")
        assert (u.size, u.inodes) == (5 * 2**40, 123)

        (resp,) = c.List()
        assert [i.name for i in resp.info] == ["ns/2/sha256:aa", "ns/3/ctr", "ns/4/view"]
        assert model.calls[-1] == ("walk", None)

        for key in ("ns/3/ctr", "ns/4/view", "ns/2/sha256:aa"):      # leaves first
            assert isinstance(c.Remove(key=key), proto.Empty)
        assert model.infos == {}
        assert isinstance(c.Cleanup(), proto.Empty)
        assert model.cleanups == 1


def test_snapshotter_field_is_ignored(tmp_path):
    with running(tmp_path) as (model, c):
        c.Prepare(snapshotter="", key="a")
        c.Prepare(snapshotter="some-other-plugin", key="b")
        assert [call[:2] for call in model.calls] == [("prepare", "a"), ("prepare", "b")]


def test_commit_without_labels_and_prepare_without_parent(tmp_path):
    with running(tmp_path) as (model, c):
        c.Prepare(key="a")
        c.Commit(name="A", key="a")
        assert model.calls == [("prepare", "a", "", {}), ("commit", "A", "a", {})]


# -- errors ---------------------------------------------------------------------------------------
def test_error_codes_from_the_model(tmp_path):
    with running(tmp_path) as (model, c):
        c.Prepare(key="a")
        e = error_of(c.Prepare, key="a")
        assert e.code() is grpc.StatusCode.ALREADY_EXISTS and e.details() == \
            "snapshot a already exists"
        assert error_of(c.Stat, key="nope").code() is grpc.StatusCode.NOT_FOUND
        assert error_of(c.Mounts, key="nope").code() is grpc.StatusCode.NOT_FOUND
        assert error_of(c.Usage, key="nope").code() is grpc.StatusCode.NOT_FOUND
        assert error_of(c.Remove, key="nope").code() is grpc.StatusCode.NOT_FOUND
        assert error_of(c.Prepare, key="b", parent="nope").code() is grpc.StatusCode.NOT_FOUND
        e = error_of(c.Prepare, key="b", parent="a")              # parent not committed
        assert e.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert e.details() == "parent a is not a committed snapshot"
        assert error_of(c.Prepare, key="").code() is grpc.StatusCode.INVALID_ARGUMENT
        c.Commit(name="A", key="a")
        e = error_of(c.Commit, name="B", key="A")                 # not active
        assert e.code() is grpc.StatusCode.FAILED_PRECONDITION
        c.Prepare(key="c", parent="A")
        assert error_of(c.Commit, name="A", key="c").code() is grpc.StatusCode.ALREADY_EXISTS
        e = error_of(c.Remove, key="A")                           # has children
        assert (e.code(), e.details()) == (grpc.StatusCode.FAILED_PRECONDITION,
                                           "snapshot A has children")
        assert error_of(c.Mounts, key="A").code() is grpc.StatusCode.FAILED_PRECONDITION
        assert error_of(c.List, filters=["size>1"]).code() is grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(model.infos) == ["A", "c"]                 # nothing changed by a failure


@pytest.mark.parametrize("exc, code", [
    (NotFound("gone"), grpc.StatusCode.NOT_FOUND),
    (AlreadyExists("there"), grpc.StatusCode.ALREADY_EXISTS),
    (BusyError("in use", holder_pid=1), grpc.StatusCode.FAILED_PRECONDITION),
    (NoDataSpace("pool full"), grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (DeviceIOError("EIO reading", device="/x", operation="read"), grpc.StatusCode.UNKNOWN),
    (ThinpoolError("plain"), grpc.StatusCode.UNKNOWN),
])
@pytest.mark.parametrize("method", ["Stat", "List", "Cleanup"])
def test_error_mapping(tmp_path, exc, code, method):
    model = ModelSnapshotter()
    model.infos["k"] = Info("k", Kind.COMMITTED)

    def fail():
        raise exc
    model.hooks = dict.fromkeys(("stat", "walk", "cleanup"), fail)
    with running(tmp_path, model) as (model, c):
        e = error_of(getattr(c, method), **({"key": "k"} if method == "Stat" else {}))
        assert (e.code(), e.details()) == (code, str(exc))


def test_unexpected_exception_is_internal_and_logged(tmp_path, caplog):
    model = ModelSnapshotter()

    def fail():
        raise KeyError("kaboom")
    model.hooks["usage"] = fail
    model.hooks["walk"] = fail
    caplog.set_level(logging.DEBUG, logger="thinpool")
    with running(tmp_path, model) as (model, c):
        for call in (lambda: c.Usage(key="k"), c.List):
            e = error_of(call)
            assert (e.code(), e.details()) == (grpc.StatusCode.INTERNAL, "KeyError: 'kaboom'")
        c.Prepare(key="still-serving")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["thinpool.runtime.grpc"] * 2
    assert errors[0].exc_info[0] is KeyError and "Usage" in errors[0].getMessage()
    assert "Traceback" in caplog.text


def test_unknown_kind_in_update_is_invalid_argument(tmp_path):
    with running(tmp_path) as (model, c):
        c.Prepare(key="a")
        e = error_of(c.Update, info=proto.Info(name="a", kind=7))
        assert e.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert [call[0] for call in model.calls] == ["prepare"]


# -- List -----------------------------------------------------------------------------------------
def test_list_streams_batches_of_100(tmp_path):
    model = ModelSnapshotter()
    for i in range(250):
        model.infos[f"s{i:03}"] = Info(f"s{i:03}", Kind.COMMITTED, labels={"i": str(i)},
                                       created_at=T0 + i, updated_at=T0 + i)
    with running(tmp_path, model) as (model, c):
        responses = c.List()
        assert [len(r.info) for r in responses] == [100, 100, 50]
        infos = [i for r in responses for i in r.info]
        assert [i.name for i in infos] == [f"s{i:03}" for i in range(250)]
        assert all(dict(i.labels) == {"i": str(n)} and seconds(i.created_at) == T0 + n
                   for n, i in enumerate(infos))
        (one,) = c.List(filters=["name==s007", "name==s142"])
        assert [i.name for i in one.info] == ["s007", "s142"]
        assert model.calls[-1] == ("walk", ["name==s007", "name==s142"])
        for i in range(200, 250):
            del model.infos[f"s{i:03}"]
        assert [len(r.info) for r in c.List()] == [100, 100]       # no empty third


def test_list_of_nothing_is_an_empty_stream(tmp_path):
    with running(tmp_path) as (model, c):
        assert c.List() == []


# -- Update ---------------------------------------------------------------------------------------
def _update(c, labels, paths=None, *, kind=Kind.COMMITTED, name="A"):
    info = proto.Info(name=name, kind=int(kind), labels=labels)     # zero timestamps
    req = proto.UpdateSnapshotRequest(snapshotter="thinpool", info=info)
    if paths is not None:
        req.update_mask.paths.extend(paths)
    return c.Update(req).info


def test_update_masks(tmp_path):
    with running(tmp_path) as (model, c):
        c.Prepare(key="a")
        c.Commit(name="A", key="a", labels={"keep": "1", "change": "2", "drop": "3"})
        created = seconds(c.Stat(key="A").info.created_at)

        got = _update(c, {"change": "new", "ignored": "x"}, ["labels.change", "labels.drop"])
        assert dict(got.labels) == {"keep": "1", "change": "new"}      # drop: masked, missing
        assert model.calls[-1][2] == ["labels.change", "labels.drop"]
        sent = model.calls[-1][1]
        assert (sent.name, sent.kind, sent.created_at, sent.updated_at) == \
            ("A", Kind.COMMITTED, 0.0, 0.0)              # zero Timestamps arrive as 0.0
        assert seconds(got.created_at) == created        # ... and change nothing
        assert seconds(got.updated_at) > created

        got = _update(c, {"gc": "root"}, ["labels.gc"])
        assert dict(got.labels) == {"keep": "1", "change": "new", "gc": "root"}

        got = _update(c, {"only": "this"})                # no mask: every label replaced
        assert dict(got.labels) == {"only": "this"}
        assert model.calls[-1][2] is None
        got = _update(c, {"x": "y"}, [])                  # an empty mask is no mask
        assert dict(got.labels) == {"x": "y"} and model.calls[-1][2] is None

        got = _update(c, {"a": "b"}, ["labels"])
        assert dict(got.labels) == {"a": "b"}
        got = _update(c, {}, ["labels"])
        assert dict(got.labels) == {}
        assert dict(c.Stat(key="A").info.labels) == {}

        e = error_of(_update, c, {}, ["parent"])
        assert e.code() is grpc.StatusCode.INVALID_ARGUMENT
        e = error_of(_update, c, {}, ["labels.x"], name="nope")
        assert e.code() is grpc.StatusCode.NOT_FOUND


# -- Timestamps -----------------------------------------------------------------------------------
def test_timestamps_both_ways():
    for t in (0.0, 1.5, T0, 1700000000.123456, 2**33 + 0.25, -1.5):
        ts = grpc_service.timestamp_of(t)
        assert 0 <= ts.nanos < 10**9
        assert abs(grpc_service.seconds_of(ts) - t) < 1e-6, t
    ts = grpc_service.timestamp_of(1700000000.5)
    assert (ts.seconds, ts.nanos) == (1700000000, 500000000)
    ts = grpc_service.timestamp_of(-1.5)
    assert (ts.seconds, ts.nanos) == (-2, 500000000)
    ts = grpc_service.timestamp_of(4.9999999999)        # the nanoseconds round up to a second
    assert (ts.seconds, ts.nanos) == (5, 0)
    assert grpc_service.seconds_of(proto.Timestamp()) == 0.0
    info = grpc_service.info_from_proto(proto.Info(name="n", kind=2))      # no Timestamps at all
    assert (info.created_at, info.updated_at, info.kind) == (0.0, 0.0, Kind.ACTIVE)


def test_stat_sends_the_snapshotters_times(tmp_path):
    model = ModelSnapshotter()
    model.infos["k"] = Info("k", Kind.ACTIVE, "", {}, 1700000000.25, 1700000099.75)
    with running(tmp_path, model) as (model, c):
        info = c.Stat(key="k").info
        assert (info.created_at.seconds, info.created_at.nanos) == (1700000000, 250000000)
        assert (info.updated_at.seconds, info.updated_at.nanos) == (1700000099, 750000000)


def test_conversions_keep_every_field():
    info = Info("n", Kind.VIEW, "p", {"a": "b"}, T0, T0 + 1)
    assert grpc_service.info_from_proto(grpc_service.info_to_proto(info)) == info
    m = Mount("ext4", "/x.img", ["loop", "ro"], "/target")
    assert grpc_service.mount_from_proto(grpc_service.mount_to_proto(m)) == m


# -- raw bytes ------------------------------------------------------------------------------------
def test_raw_wire_bytes_in_and_out(tmp_path):
    """A request written as protobuf bytes by hand, the response compared with bytes by hand:
    the service's field numbers are the protocol's, whatever the client library thinks."""
    class LoopModel(ModelSnapshotter):
        def _mounts(self, info):
            return [Mount("ext4", "/dev/loop0", ["ro", "loop"], "t")]

    with running(tmp_path, LoopModel()) as (model, c):
        request = (b"\x0a\x08thinpool"                   # snapshotter = 1
                   b"\x12\x02k1"                         # key = 2
                   b"\x22\x06\x0a\x01a\x12\x01b")        # labels = 4: {"a": "b"}
        response = c.raw("Prepare", request)
        assert response == (b"\x0a\x1f"                  # mounts = 1, 31 bytes
                            b"\x0a\x04ext4\x12\x0a/dev/loop0\x1a\x01t\x22\x02ro\x22\x04loop")
        assert model.calls[-1] == ("prepare", "k1", "", {"a": "b"})
        assert c.raw("Commit", b"\x0a\x02tp\x12\x02c1\x1a\x02k1") == b""   # name=2, key=3: Empty
        assert model.calls[-1] == ("commit", "c1", "k1", {})
        model.usages["c1"] = Usage(size=2**40, inodes=3)
        assert c.raw("Usage", b"\x12\x02c1") == b"\x08\x80\x80\x80\x80\x80\x20\x10\x03"
        e = error_of(c.raw, "Stat", b"\x12\x02zz")
        assert e.code() is grpc.StatusCode.NOT_FOUND


# -- the socket -----------------------------------------------------------------------------------
def test_a_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "tp.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()                                            # the file stays, nobody listens
    assert path.is_socket()
    with running(tmp_path) as (model, c):
        c.Prepare(key="a")


def test_a_live_socket_is_refused(tmp_path):
    path = tmp_path / "tp.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    try:
        with pytest.raises(BusyError):
            grpc_service.serve(ModelSnapshotter(), path)
        assert path.is_socket()                          # left to its owner
    finally:
        s.close()


def test_a_second_service_on_the_same_socket_is_refused(tmp_path):
    with running(tmp_path) as (model, c):
        with pytest.raises(BusyError):
            grpc_service.serve(ModelSnapshotter(), tmp_path / "tp.sock")
        c.Prepare(key="still-the-first")
        assert model.calls[-1][:2] == ("prepare", "still-the-first")


def test_bad_paths_and_arguments(tmp_path):
    other = tmp_path / "tp.sock"
    other.write_text("not a socket")
    with pytest.raises(InvalidArgument):
        grpc_service.serve(ModelSnapshotter(), other)
    assert other.read_text() == "not a socket"
    with pytest.raises(NotFound):
        grpc_service.serve(ModelSnapshotter(), tmp_path / "no-dir" / "tp.sock")
    with pytest.raises(InvalidArgument):
        grpc_service.serve(ModelSnapshotter(), tmp_path / ("x" * 120))
    with pytest.raises(InvalidArgument):
        grpc_service.serve(ModelSnapshotter(), tmp_path / "ok.sock", max_workers=0)
    assert not (tmp_path / "ok.sock").exists()


def test_relative_socket_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = grpc_service.serve(ModelSnapshotter(), "rel.sock")
    try:
        assert (tmp_path / "rel.sock").is_socket()
        c = Client(str(tmp_path / "rel.sock"))
        c.Prepare(key="a")
        c.channel.close()
    finally:
        server.stop(None).wait(10)


# -- concurrency ----------------------------------------------------------------------------------
def test_calls_run_at_once(tmp_path):
    """The service takes no lock: two Stats are inside the snapshotter together (the barrier
    would time out otherwise), so the snapshotter's own lock is what orders calls."""
    model = ModelSnapshotter()
    model.infos["k"] = Info("k", Kind.COMMITTED)
    barrier = threading.Barrier(2, timeout=10)
    model.hooks["stat"] = barrier.wait
    with running(tmp_path, model, max_workers=2) as (model, c):
        results = []
        threads = [threading.Thread(target=lambda: results.append(c.Stat(key="k").info.name))
                   for _ in range(2)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert results == ["k", "k"] and time.monotonic() - start < 10

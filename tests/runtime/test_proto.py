"""The protocol's messages against raw protobuf wire bytes written by hand: a wrong field number,
type or label in proto.py's table changes the bytes and fails. Also the descriptors' shape (map
entries, the Kind enum, the service's methods) and importing without the optional packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from thinpool.runtime.types import Kind

REPO = Path(__file__).resolve().parents[2]

try:
    from thinpool.runtime import proto
    MISSING = None
except ImportError as e:          # MissingDependency
    MISSING = str(e)

needs_protobuf = pytest.mark.skipif(MISSING is not None, reason=f"runtime extra: {MISSING}")

# Wire format: a tag is (field_number << 3) | wire_type; 0 varint, 2 length-delimited.
# 0x0a = field 1 LEN, 0x12 = 2 LEN, 0x1a = 3 LEN, 0x22 = 4 LEN, 0x2a = 5 LEN, 0x32 = 6 LEN,
# 0x08 = field 1 varint, 0x10 = 2 varint, 0x18 = 3 varint. A map entry is a message {1: key, 2: value}.
PREPARE = (b"\x0a\x08thinpool"                      # snapshotter = 1
           b"\x12\x02k1"                            # key = 2
           b"\x1a\x02p0"                            # parent = 3
           b"\x22\x06\x0a\x01a\x12\x01b")           # labels = 4: {"a": "b"}
MOUNT = (b"\x0a\x04ext4"                            # type = 1
         b"\x12\x0a/dev/loop0"                      # source = 2
         b"\x1a\x01t"                               # target = 3
         b"\x22\x02ro\x22\x04loop")                 # options = 4 (repeated)
MOUNTS_RESPONSE = b"\x0a\x1f" + MOUNT               # mounts = 1 (31 bytes)
COMMIT = b"\x0a\x02tp\x12\x04name\x1a\x03key\x22\x06\x0a\x01x\x12\x01y"
INFO = (b"\x0a\x01n"                                # name = 1
        b"\x12\x01p"                                # parent = 2
        b"\x18\x03"                                 # kind = 3: COMMITTED
        b"\x22\x0b\x08\x80\xe2\xcf\xaa\x06\x10\x95\x9a\xef\x3a"   # created_at = 4
        b"\x2a\x06\x08\x80\xe2\xcf\xaa\x06"         # updated_at = 5: {seconds: 1700000000}
        b"\x32\x06\x0a\x01a\x12\x01b")              # labels = 6 (37 bytes in all)
UPDATE = b"\x0a\x02tp\x12\x25" + INFO + b"\x1a\x0a\x0a\x08labels.a"   # info = 2, update_mask = 3
USAGE = b"\x08\x80\x80\x80\x80\x80\x20\x10\x03"     # size = 1: 2**40, inodes = 2: 3
LIST_REQUEST = b"\x0a\x02tp\x12\x02f1\x12\x02f2"    # filters = 2 (repeated)


@needs_protobuf
def test_prepare_request_bytes():
    msg = proto.PrepareSnapshotRequest(snapshotter="thinpool", key="k1", parent="p0",
                                       labels={"a": "b"})
    assert msg.SerializeToString() == PREPARE
    back = proto.ViewSnapshotRequest.FromString(PREPARE)     # the same fields
    assert (back.snapshotter, back.key, back.parent, dict(back.labels)) == \
        ("thinpool", "k1", "p0", {"a": "b"})


@needs_protobuf
def test_mounts_response_bytes():
    m = proto.Mount(type="ext4", source="/dev/loop0", target="t", options=["ro", "loop"])
    assert m.SerializeToString() == MOUNT
    for cls in (proto.MountsResponse, proto.PrepareSnapshotResponse, proto.ViewSnapshotResponse):
        assert cls(mounts=[m]).SerializeToString() == MOUNTS_RESPONSE
    back = proto.MountsResponse.FromString(MOUNTS_RESPONSE).mounts[0]
    assert (back.type, back.source, back.target, list(back.options)) == \
        ("ext4", "/dev/loop0", "t", ["ro", "loop"])


@needs_protobuf
def test_commit_info_update_usage_list_bytes():
    assert proto.CommitSnapshotRequest(snapshotter="tp", name="name", key="key",
                                       labels={"x": "y"}).SerializeToString() == COMMIT
    info = proto.Info(name="n", parent="p", kind=3, labels={"a": "b"})
    info.created_at.seconds, info.created_at.nanos = 1700000000, 123456789
    info.updated_at.seconds = 1700000000
    assert info.SerializeToString() == INFO
    assert proto.StatSnapshotResponse(info=info).SerializeToString() == b"\x0a\x25" + INFO
    assert proto.UpdateSnapshotResponse(info=info).SerializeToString() == b"\x0a\x25" + INFO
    assert proto.ListSnapshotsResponse(info=[info, info]).SerializeToString() == \
        (b"\x0a\x25" + INFO) * 2
    req = proto.UpdateSnapshotRequest(snapshotter="tp", info=info)
    req.update_mask.paths.append("labels.a")
    assert req.SerializeToString() == UPDATE
    assert proto.UsageResponse(size=2**40, inodes=3).SerializeToString() == USAGE
    assert proto.ListSnapshotsRequest(snapshotter="tp", filters=["f1", "f2"]
                                      ).SerializeToString() == LIST_REQUEST
    for cls in (proto.MountsRequest, proto.RemoveSnapshotRequest, proto.StatSnapshotRequest,
                proto.UsageRequest):
        assert cls(snapshotter="tp", key="k").SerializeToString() == b"\x0a\x02tp\x12\x01k"
    assert proto.CleanupRequest(snapshotter="tp").SerializeToString() == b"\x0a\x02tp"
    assert proto.Empty().SerializeToString() == b""


@needs_protobuf
def test_descriptors():
    pkg = "containerd.services.snapshots.v1"
    fd = proto.POOL.FindFileByName("containerd/services/snapshots/v1/snapshots.proto")
    assert fd.package == pkg
    assert sorted(d.name for d in fd.dependencies) == [
        "containerd/types/mount.proto", "google/protobuf/empty.proto",
        "google/protobuf/field_mask.proto", "google/protobuf/timestamp.proto"]
    kind = proto.POOL.FindEnumTypeByName(f"{pkg}.Kind")
    assert {v.name: v.number for v in kind.values} == {k.name: k.value for k in Kind}
    for msg, field in (("PrepareSnapshotRequest", "labels"), ("ViewSnapshotRequest", "labels"),
                       ("CommitSnapshotRequest", "labels"), ("Info", "labels")):
        entry = proto.POOL.FindMessageTypeByName(f"{pkg}.{msg}").fields_by_name[field].message_type
        assert entry.GetOptions().map_entry and entry.name == "LabelsEntry"
        assert [f.name for f in entry.fields] == ["key", "value"]
    service = proto.POOL.FindServiceByName(proto.SERVICE)
    assert proto.SERVICE == f"{pkg}.Snapshots"
    assert [m.name for m in service.methods] == ["Prepare", "View", "Mounts", "Commit", "Remove",
                                                  "Stat", "Update", "List", "Usage", "Cleanup"]
    for m in service.methods:
        method = proto.METHODS[m.name]
        assert method.path == f"/{pkg}.Snapshots/{m.name}"
        assert method.request.DESCRIPTOR.full_name == m.input_type.full_name
        assert method.response.DESCRIPTOR.full_name == m.output_type.full_name
        assert method.server_streaming == (m.name == "List")
    from google.protobuf import descriptor_pb2
    added = descriptor_pb2.FileDescriptorProto.FromString(fd.serialized_pb)   # as in the pool
    assert [m.name for m in added.service[0].method if m.server_streaming] == ["List"]
    assert proto.METHODS["Commit"].response.DESCRIPTOR.full_name == "google.protobuf.Empty"
    # every message of the table is a class of the module under its own name
    for _package, _imports, _enums, messages in proto.FILES.values():
        for name in messages:
            assert getattr(proto, name).DESCRIPTOR.name == name


def _run_without(modules: list[str], code: str) -> str:
    blocked = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", "import sys\n" + blocked + code],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("blocked, module, what", [
    (["grpc"], "thinpool.runtime.grpc_service", "grpcio"),
    (["google.protobuf", "google"], "thinpool.runtime.proto", "protobuf"),
    (["google.protobuf", "google", "grpc"], "thinpool.runtime.grpc_service", "protobuf"),
])
def test_import_without_the_runtime_extra_is_a_typed_error(blocked, module, what):
    out = _run_without(blocked, (
        "import thinpool, thinpool.runtime, thinpool.runtime.types, thinpool.errors\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e.what, e)\n"))
    assert out.startswith(f"MissingDependency {what} "), out
    assert "pip install 'thinpool[runtime]'" in out

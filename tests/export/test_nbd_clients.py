"""The NBD server against the real clients: qemu-io, qemu-img (info, map, convert), nbdinfo and
nbdcopy (Debian qemu-utils and libnbd-bin; each test skips naming the package it misses). The
pool passes thin_check and thinpool check afterwards (the ``served`` fixture)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from tests.export.conftest import BIG, BS, VOL_SIZE
from tests.tptools import requires_tools

pytestmark = requires_tools


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package {package})")
    return path


def run(*argv, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, **kw)
    assert r.returncode == 0, (argv, r.stdout, r.stderr)
    return r


def test_qemu_io_patterns(served):
    qemu_io = need("qemu-io", "qemu-utils")
    uri = served.uri("v")
    r = run(qemu_io, "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 3M 100k",
            "-c", "write -z 1M 128k", "-c", "discard 3M 64k", "-c", "read -P 0xab 0 1M",
            "-c", "read -P 0 1M 128k", "-c", "read -P 0 3M 64k",
            "-c", "read -P 0xcd 3136k 36k", uri)
    assert "Pattern verification failed" not in r.stdout + r.stderr
    vol = served.pool.volume("v")
    assert vol.read(0, 1 << 20) == b"\xab" * (1 << 20)
    assert vol.read(3 << 20, 64 << 10) == bytes(64 << 10)
    r = run(qemu_io, "-f", "raw", "-t", "writeback", "-c", "write -P 0x11 5M 64k",
            "-c", "write -z -u 5M 64k", "-c", "read -P 0 5M 64k", uri)
    assert "Pattern verification failed" not in r.stdout + r.stderr
    # read-only export: qemu needs -r, and then refuses writes itself
    r = subprocess.run([qemu_io, "-f", "raw", "-r", "-c", "read -P 0 0 4k", served.uri("ro")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout


def test_qemu_img_info_and_map(served):
    qemu_img = need("qemu-img", "qemu-utils")
    vol = served.pool.volume("v")
    vol.write(2 * BS, b"x" * BS)
    vol.write(10 * BS, b"y")
    info = json.loads(run(qemu_img, "info", "--output=json", "-f", "raw", served.uri("v")).stdout)
    assert info["virtual-size"] == VOL_SIZE and info["format"] == "raw"
    extents = json.loads(run(qemu_img, "map", "--output=json", "-f", "raw",
                             served.uri("v")).stdout)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data == [(2 * BS, BS), (10 * BS, BS)]
    holes = [e for e in extents if not e["data"]]
    assert holes and all(e["zero"] for e in holes)
    assert sum(e["length"] for e in extents) == VOL_SIZE


def test_nbdinfo_and_map(served):
    nbdinfo = need("nbdinfo", "libnbd-bin")
    served.pool.volume("w").write(BS, b"z" * (2 * BS))
    doc = json.loads(run(nbdinfo, "--json", served.uri("w")).stdout)
    export = doc["exports"][0]
    assert export["export-size"] == VOL_SIZE and export["can_multi_conn"]
    assert export["block_size_preferred"] == BS and "base:allocation" in export["contexts"]
    ro = json.loads(run(nbdinfo, "--json", served.uri("ro")).stdout)["exports"][0]
    assert ro["is_read_only"]
    lines = run(nbdinfo, "--map", served.uri("w")).stdout.split("\n")
    rows = [ln.split() for ln in lines if ln.strip()]
    assert [(int(a), int(b), int(c)) for a, b, c, *_ in rows] == \
        [(0, BS, 3), (BS, 2 * BS, 0), (3 * BS, VOL_SIZE - 3 * BS, 3)]
    listed = run(nbdinfo, "--list", "--json", f"nbd+unix://?socket={served.socket}").stdout
    assert {e["export-name"] for e in json.loads(listed)["exports"]} == {"v", "w", "ro", "big"}


def test_nbdcopy_round_trip_four_connections(served, tmp_path):
    nbdcopy = need("nbdcopy", "libnbd-bin")
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(BIG >> 20):
            if i % 8 == 5:
                f.seek(1 << 20, os.SEEK_CUR)       # some holes
            else:
                f.write(block[i:] + block[:i])
        f.truncate(BIG)
    uri = served.uri("big")
    run(nbdcopy, "--connections", "4", "--flush", str(src), uri)
    assert not served.pool.metadata.has_changes()      # --flush committed everything
    out = tmp_path / "out.img"
    run(nbdcopy, "--connections", "4", uri, str(out))

    def sha(p):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()
    assert sha(src) == sha(out)
    vol = served.pool.volume("big")
    assert vol.mapped_blocks < BIG // BS                 # the holes stayed unmapped


def test_qemu_img_convert_to_qcow2_and_back(served, tmp_path):
    qemu_img = need("qemu-img", "qemu-utils")
    vol = served.pool.volume("v")
    vol.write(4 * BS, os.urandom(3 * BS))
    q = tmp_path / "v.qcow2"
    run(qemu_img, "convert", "-f", "raw", "-O", "qcow2", served.uri("v"), str(q))
    assert os.stat(q).st_blocks * 512 < 2 << 20          # sparse: 192 KiB of data in 16 MiB
    run(qemu_img, "convert", "-n", "-f", "qcow2", "-O", "raw", str(q), served.uri("w"))
    assert served.pool.volume("w").read(0, VOL_SIZE) == vol.read(0, VOL_SIZE)
    assert served.pool.volume("w").mapped_blocks <= 4

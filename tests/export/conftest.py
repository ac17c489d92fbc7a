"""Fixtures of the export tests: a pool with volumes served in this process over a Unix socket
(in a short private directory: a socket path holds at most 107 bytes), closed in ``finally``;
and a check that both metadata checkers pass afterwards."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tptools import assert_checks_pass
from thinpool import Pool
from thinpool.export.nbd import NBDServer

BS = 64 * 1024
VOL_SIZE = 16 << 20
BIG = 256 << 20


@dataclass
class Served:
    pool: Pool
    server: NBDServer
    socket: str
    dir: Path

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"


def short_dir() -> str:
    return tempfile.mkdtemp(prefix="tpn-", dir="/tmp")


@pytest.fixture
def home():
    """A short home directory for CLI tests (socket paths must stay under 108 bytes); removed
    afterwards."""
    d = Path(tempfile.mkdtemp(prefix="tps-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(tmp_path):
    """Pool ``p`` (320 MiB of data) with volumes ``v`` and ``w`` (16 MiB each), ``ro``
    (read-only) and ``big`` (256 MiB), served with a 0.2 s commit interval. After the test: server closed, pool closed,
    thin_check and thinpool check pass."""
    d = short_dir()
    pool = Pool.create(tmp_path / "p", data_size=BIG + (64 << 20), block_size=BS)
    server = None
    try:
        pool.create_thin("v", VOL_SIZE)
        pool.create_thin("w", VOL_SIZE)
        pool.create_thin("ro", VOL_SIZE)
        pool.set_read_only("ro", True)
        pool.create_thin("big", BIG)
        server = NBDServer(pool, commit_interval=0.2)
        sock = server.listen_unix(Path(d) / "s")
        server.start()
        yield Served(pool, server, sock, tmp_path / "p")
    finally:
        try:
            if server is not None:
                server.close()
        finally:
            pool.close()
            shutil.rmtree(d, ignore_errors=True)
    assert_checks_pass(tmp_path / "p" / "metadata")

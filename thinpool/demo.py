"""A short real session on a default pool: create, write, snapshot, copy-on-write, stat.

Run with ``python -m thinpool.demo [DIR]``; the pool goes into DIR (default: a new temporary
directory, removed afterwards). This module prints: it is a program, not part of the library.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from . import Pool
from .units import format_size


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    keep = bool(argv)
    base = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="thinpool-demo-"))
    path = base / "demo-pool"
    try:
        with Pool.create(path, data_size=1 << 30) as pool:
            print(f"created pool {path} with {format_size(1 << 30)} of data space")
            vol = pool.create_thin("vol0", 100 << 30)
            print(f"created thin volume vol0 of {format_size(vol.size)} (more than the pool)")
            vol.write(0, b"hello from thinpool\n" * 1000)
            pool.commit()
            snap = pool.snapshot("vol0", "snap0")
            vol.write(0, b"HELLO")
            print("vol0 now starts with ", vol.read(0, 19))
            print("snap0 still starts with", snap.read(0, 19))
            st = pool.stat().as_dict()
            print(json.dumps(st, indent=2))
        return 0
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

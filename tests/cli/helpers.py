"""Running the installed ``thinpool`` console script as an admin would, and pool fingerprints."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


def _thinpool_command() -> list[str]:
    script = Path(sysconfig.get_path("scripts")) / "thinpool"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("thinpool")
    return [found] if found else [sys.executable, "-m", "thinpool"]


THINPOOL = _thinpool_command()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("THINPOOL_HOME", "THINPOOL_DEBUG", "COLUMNS")}
    env.update(extra)
    return env


def tp(home: Path, *args: str, input: bytes | str | None = b"", check: int | None = None,
       **kw) -> subprocess.CompletedProcess:
    """Run ``thinpool --home HOME ARGS``; stdout is bytes, stderr text. ``check``: expected code."""
    if isinstance(input, str):
        input = input.encode()
    r = subprocess.run([*THINPOOL, "--home", str(home), *args], input=input,
                       capture_output=True, env=clean_env(), timeout=120, **kw)
    r.stderr = r.stderr.decode(errors="replace")
    r.out = r.stdout.decode(errors="replace")
    if check is not None:
        assert r.returncode == check, (args, r.returncode, r.out, r.stderr)
    return r


def fingerprint(pool_dir: Path) -> dict[str, str]:
    """sha256 of every file in a pool directory (metadata, data, names.json, pool.json)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pool_dir.iterdir()) if p.is_file()}


def assert_one_line_error(r, code: int, *fragments: str) -> None:
    """A failed command: the exit code, exactly one ``thinpool: ...`` line on stderr, no
    traceback, and each fragment in that line."""
    assert r.returncode == code, (r.returncode, getattr(r, "out", None), r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("thinpool: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)

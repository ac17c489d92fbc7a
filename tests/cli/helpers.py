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


def tp_terminal(home: Path, *args: str, answer: bytes | int = b"", timeout: float = 60):
    """Run ``thinpool --home HOME ARGS`` with stdin and stderr on a pseudo-terminal (so it may
    ask a question), typing ``answer`` at the question (an int: send that signal instead, as
    Ctrl-C would); stdout is a pipe. Returns (exit code, stdout bytes,
    what the terminal showed)."""
    import pty
    import select
    import time

    default_sigint()
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([*THINPOOL, "--home", str(home), *args], stdin=slave,
                             stdout=subprocess.PIPE, stderr=slave, env=clean_env(),
                             close_fds=True)
    finally:
        os.close(slave)
    shown = b""
    typed = False
    signalled = 0.0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:             # the child closed the terminal (EIO)
                    break
                if not chunk:
                    break
                shown += chunk
                if not typed and b"[y/N]" in shown:
                    if isinstance(answer, int):
                        p.send_signal(answer)
                        signalled = time.monotonic()
                    else:
                        os.write(master, answer)
                    typed = True
            elif p.poll() is not None:
                break
            elif isinstance(answer, int) and typed and time.monotonic() - signalled > 0.2:
                # A signal that lands just before the read of the answer starts only takes
                # effect at the next input (CPython's read loop): press Ctrl-C again, as a
                # person would.
                p.send_signal(answer)
                signalled = time.monotonic()
        try:
            code = p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        out = p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        os.close(master)
    return code, out, shown.decode(errors="replace")


def default_sigint() -> None:
    """Make sure children started from here get SIGINT as a terminal delivers it. A shell
    starts background jobs with SIGINT ignored, and an ignored signal stays ignored across
    fork and exec (Python then installs no handler), so a test run in the background would see
    no interrupt; a handled signal is reset to its default in the child."""
    import signal
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

"""Commands that change a served pool, run by the process that serves it.

While ``thinpool serve`` holds a pool (its writer lock, for as long as it runs), a command such
as ``thinpool snapshot demo/vol0 snap`` cannot open the pool for writing. As ``dmsetup message``
asks the kernel's live pool to make a snapshot, such a command is instead sent to the serving
process over its control socket (``{"op": "run", ...}``) and run there, in that process, on the
pool it holds (between two NBD requests; the pool is thread-safe); its output lines and exit
code come back and are this command's. Only the commands in :data:`FORWARDED` go that way,
and only when the holder of the writer lock is the pool's own ``thinpool serve``; everything
else still fails with exit 5 naming it (``destroy``, pool renames, ``write`` whose input is a
stream, the metadata tools).

In the serving process a forwarded command refuses (exit 5, :func:`refuse_in_use`) to delete,
revert, merge, rename or resize a volume that is in use there: attached as a loop device or
open on an NBD connection. Confirmations given at the terminal of the command that was
forwarded count there. A forwarded command that fails changes nothing: it runs the same
library calls as a command of its own, and each of those is whole or not at all in the open
pool; nothing it did is committed unless it succeeds.

The client side is :class:`Forward` (raised where the pool would have been opened, before any
change) and :func:`forward`; the serving side is :func:`run_held`, given to the daemon.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinpool.errors import BusyError

#: The commands a pool's ``thinpool serve`` runs for other processes.
FORWARDED = frozenset({"create", "snapshot", "delete", "rename", "resize", "configure",
                       "revert", "merge", "discard",
                       # the container runtime's groups (cli/runtime.py)
                       "runtime", "image", "container", "volume"})
#: Output a forwarded command may send back (the control socket's line limit is 64 KiB).
MAX_OUTPUT = 16 << 10


class Forward(Exception):
    """Raised by the session instead of opening a pool its ``thinpool serve`` holds; the
    command line sends the command there (:func:`forward`)."""

    def __init__(self, pool_dir: Path, pid: int, home: Path, argv: list[str] | None = None):
        super().__init__(f"pool {pool_dir} is held by thinpool serve {pid}")
        self.pool_dir = pool_dir
        self.pid = pid
        self.home = home
        #: The command line to send instead of this process's own (its paths made absolute:
        #: the serving process runs in ``/``).
        self.argv = argv


@dataclass
class Held:
    """The pool the serving process holds, while it runs a forwarded command."""
    pool: Any
    pool_dir: Path
    daemon: Any
    confirmed: bool

    def holds(self, path: Path) -> bool:
        try:
            return os.path.samefile(path, self.pool_dir)
        except OSError:
            return False


#: Set in the serving process while it runs a forwarded command (one at a time).
HELD: Held | None = None
_running = threading.Lock()


def command_args(args: list[str]) -> tuple[list[str], bool]:
    """The command and its arguments from a whole command line (global options dropped), and
    whether ``--debug`` was among them."""
    i, debug = 0, False
    while i < len(args):
        a = args[i]
        if a == "--home":
            i += 2
        elif a.startswith("--home="):
            i += 1
        elif a == "--debug":
            debug, i = True, i + 1
        else:
            break
    return args[i:], debug


def forward(args: list[str], f: Forward, confirmed: bool) -> int:
    """Send the command line ``args`` to the ``thinpool serve`` holding ``f.pool_dir``; print
    what it printed and return its exit code."""
    from thinpool.export.state import ask

    from . import output
    sub, debug = command_args(args)
    if f.argv is not None:
        sub = list(f.argv)
    answer = ask(f.pool_dir, {"op": "run", "argv": sub, "home": str(Path(f.home).absolute()),
                              "debug": debug, "confirmed": confirmed})
    if "exit_code" in answer and "stdout" in answer:
        output.write_text(answer["stdout"])
        output.write_err_text(answer.get("stderr", ""))
        return int(answer["exit_code"])
    output.error(answer.get("error", "thinpool serve did not run the command"))
    return int(answer.get("exit_code", 1))


def run_held(request: dict, daemon) -> dict:
    """In the serving process: run a forwarded command on ``daemon.pool`` (see the module
    docstring); its output and exit code."""
    global HELD
    from thinpool.errors import InvalidArgument

    from . import _run
    argv, home = request.get("argv"), request.get("home")
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
            and isinstance(home, str)):
        raise InvalidArgument("a run request needs argv (a list of strings) and home")
    if argv[0] not in FORWARDED:
        raise InvalidArgument(f"thinpool serve does not run {argv[0]!r} for others (it runs "
                              f"{', '.join(sorted(FORWARDED))})")
    out, err = io.StringIO(), io.StringIO()
    with _running:
        HELD = Held(daemon.pool, daemon.dir, daemon, bool(request.get("confirmed")))
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = _run(["--home", home, *(["--debug"] if request.get("debug") else []),
                             *argv])
        finally:
            HELD = None
    return {"ok": True, "exit_code": code, "stdout": out.getvalue()[:MAX_OUTPUT],
            "stderr": err.getvalue()[:MAX_OUTPUT]}


def refuse_in_use(pool_name: str, *volumes: str) -> None:
    """In the serving process: BusyError (exit 5) if any of ``volumes`` is in use there."""
    held = HELD
    if held is None:
        return
    for name in volumes:
        use = held.daemon.in_use(name)
        if use:
            raise BusyError(f"volume {pool_name}/{name} is in use: {use}; "
                            + ("detach it first ('thinpool detach "
                               f"{pool_name}/{name}')" if "attached" in use else
                               "disconnect its NBD clients first"))

"""``thinpool``, the admin command line: parse -> call the library -> render.

Layout:

* ``app.py``     the click group, the session (home directory; the one place a pool is opened and
                 locked for a command), parameter types for sizes and ``POOL[/NAME]``
* ``output.py``  the one output gateway (stdout/stderr, ``--json``, rich tables, progress bars)
* ``pools.py``   create, resize, destroy
* ``volumes.py`` snapshot, delete
* ``info.py``    stat, list (their lvs-style report options and rendering: ``report.py``)
* ``data.py``    write, read, import, export
* ``mapping.py`` map, diff (a volume's mappings in bytes; two volumes' differing ranges)
* ``adopt.py``   adopt (an existing dm-thin metadata/data pair as a pool)
* ``exports.py`` serve (the pool's volumes over NBD, in the foreground or as a daemon; --stop)
* ``runtime.py`` snapshotter serve (containerd's proxy snapshotter), runtime, image, container,
                 volume (the container runtime backend)
* ``safety.py``  what commands check before they write a file they are given (a pool's own
                 files are refused, a non-empty output needs a yes) and how they write it

A command module registers its commands on :data:`app.cli` when imported; to add a group of
commands, add a module and its name to :data:`COMMAND_MODULES`.

:func:`main` is the only place that turns failures into exit codes (the list is
:data:`EXIT_CODES`): a :class:`~thinpool.errors.ThinpoolError` becomes one line
``thinpool: <message>`` and its ``exit_code``; a click usage error one line and 2; an interrupt
(SIGINT, wherever it lands: in a command, in click's parsing or prompts, in a progress bar) the
line ``thinpool: interrupted`` and 130; SIGTERM ``thinpool: terminated`` and 143 (both unwind
through every ``finally``, so a half-made pool is removed and an open pool is closed without
committing); stdout that cannot take a command's result (see :mod:`.output`) 4 when full, 1 when
closed, and 141 without a word when its reader went away (``| head``), as for a process killed
by SIGPIPE. Anything unexpected is one line, a hint about ``--debug`` and 1. ``--debug`` (or
``THINPOOL_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

COMMAND_MODULES = ("pools", "volumes", "info", "data", "tools", "mapping", "adopt",
                   "exports", "runtime")

#: Every exit code the command line uses, with its meaning (README.md lists the same).
EXIT_CODES = {0: "success", 1: "failure", 2: "bad usage or argument",
              3: "metadata corrupt (or check found problems)", 4: "out of space",
              5: "busy", 130: "interrupted (SIGINT)", 141: "stdout's reader went away (SIGPIPE)",
              143: "terminated (SIGTERM)"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so it unwinds as an interrupt does."""


def _on_sigterm(signum, frame):
    raise Terminated()

_loaded = False


def load_commands():
    """Import every command module (each registers its commands on the group); return the group."""
    global _loaded
    from .app import cli
    if not _loaded:
        from .app import WAIT_OPTION
        for name in COMMAND_MODULES:
            importlib.import_module(f"{__name__}.{name}")
        for command in cli.commands.values():
            command.params.append(WAIT_OPTION)
        _loaded = True
    return cli


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return its exit code (the console script passes it to sys.exit)."""
    _keep_std_descriptors()
    saved_term = _install(signal.SIGTERM, _on_sigterm)
    saved_stdout = sys.stdout
    try:
        try:
            from . import output
            output.start()
            sys.stdout = output.guard_stdout(saved_stdout)
            code = _run(sys.argv[1:] if argv is None else list(argv))
            return _finish(code)
        except KeyboardInterrupt as e:    # outside _run: during the imports or the last flush
            return _interrupted(e)
        finally:
            sys.stdout = saved_stdout
    finally:
        if argv is None:        # the process's entry point: the exit code is decided, keep it
            _install(signal.SIGINT, signal.SIG_IGN)
            _install(signal.SIGTERM, signal.SIG_IGN)
        else:
            _install(signal.SIGTERM, saved_term)


def _run(args: list[str]) -> int:
    import click

    from thinpool.errors import ThinpoolError

    from . import app, output

    from .forward import Forward, forward

    given, args = args, _wait_args(args)
    app.DEBUG = os.environ.get("THINPOOL_DEBUG", "") not in ("", "0")
    app.CONFIRMED = False
    try:
        # What click's Command.main does with standalone_mode=False, without its turning an
        # interrupt into Abort (after a blank line on stderr) and EPIPE into exit 1.
        group = load_commands()
        with group.make_context("thinpool", args) as ctx:
            rv = group.invoke(ctx)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:          # --help, --version
        return e.exit_code
    except Forward as f:                        # the pool's thinpool serve runs it
        try:
            return forward(given, f, app.CONFIRMED)
        except ThinpoolError as e:
            output.error(str(e))
            return e.exit_code
    except output.StdoutError as e:
        if not e.quiet:
            output.error(str(e))
        return e.exit_code
    except ThinpoolError as e:
        _traceback(app.DEBUG)
        output.error(str(e))
        return e.exit_code
    except click.ClickException as e:
        _traceback(app.DEBUG)
        output.error(_usage_line(e))
        return e.exit_code
    except click.Abort as e:            # click turns an interrupt (and EOF at a prompt) into this
        cause = e.__cause__ or e.__context__
        if isinstance(cause, KeyboardInterrupt):
            return _interrupted(cause)
        output.error("aborted")
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except Exception as e:  # noqa: BLE001 - the last resort: one line, no traceback
        interrupt = _interrupt_inside(e)
        if interrupt is not None:        # wrapped on the way, e.g. by class creation
            return _interrupted(interrupt)
        _traceback(app.DEBUG)
        if app.DEBUG:
            output.error(f"unexpected error: {type(e).__name__}: {e}")
        else:
            output.error(f"unexpected error: {type(e).__name__}: {e} "
                         f"(run with --debug for a traceback)")
        return 1


def _interrupt_inside(e: BaseException) -> KeyboardInterrupt | None:
    """The interrupt an exception was raised from, if any: Python wraps one that lands in a
    class body's ``__set_name__`` (a module imported lazily mid-command) in a RuntimeError."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _interrupted(e: BaseException) -> int:
    from . import output
    if isinstance(e, Terminated):
        output.error("terminated")
        return 143
    output.error("interrupted")
    return 130


def _install(signum, handler):
    """Set a signal handler if this is the main thread; return the previous one."""
    try:
        return signal.signal(signum, handler)
    except (ValueError, TypeError):      # not the main thread, or no previous Python handler
        return None


def _keep_std_descriptors() -> None:
    """A process started with descriptor 0, 1 or 2 closed would hand that number to the next
    file it opens (a pool's data file, an export), and whatever then goes to "stdout" would land
    in it. Hold each closed one with /dev/null opened read-only: reads see EOF, writes fail."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            held = os.open(os.devnull, os.O_RDONLY)
            if held != fd:
                os.dup2(held, fd)
                os.close(held)


def _wait_args(args: list[str]) -> list[str]:
    """``--wait`` takes an optional value: ``--wait 30`` and ``--wait=30`` wait 30 s, a bare
    ``--wait`` (before anything that is not a number) as long as it takes."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out += args[i:]
            break
        if a == "--wait":
            nxt = args[i + 1] if i + 1 < len(args) else ""
            try:
                float(nxt)
            except ValueError:
                out.append("--wait=forever")
            else:
                out.append(f"--wait={nxt}")
                i += 1
        else:
            out.append(a)
        i += 1
    return out


def _usage_line(e) -> str:
    msg = e.format_message()
    ctx = getattr(e, "ctx", None)
    if ctx is not None and getattr(e, "exit_code", 1) == 2:
        msg += f" (see '{ctx.command_path} --help')"
    return msg


def _traceback(debug: bool) -> None:
    if debug:
        import traceback
        traceback.print_exc()


def _finish(code: int) -> int:
    """Flush stdout; a reader that went away (``| head``) means exit 141 and no message."""
    from . import output
    try:
        sys.stdout.flush()
    except output.StdoutError as e:
        if e.quiet:
            _drop_stdout()
        else:
            output.error(str(e))
        return code or e.exit_code
    return code


def _drop_stdout() -> None:
    """Point descriptor 1 at /dev/null so that the interpreter's own last flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass

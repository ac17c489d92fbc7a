"""``thinpool``, the admin command line: parse -> call the library -> render.

Layout:

* ``app.py``     the click group, the session (home directory; the one place a pool is opened and
                 locked for a command), parameter types for sizes and ``POOL[/NAME]``
* ``output.py``  the one output gateway (stdout/stderr, ``--json``, rich tables, progress bars)
* ``pools.py``   create, resize, destroy
* ``volumes.py`` snapshot, delete
* ``info.py``    stat, list
* ``data.py``    write, read, import, export

A command module registers its commands on :data:`app.cli` when imported; to add a group of
commands, add a module and its name to :data:`COMMAND_MODULES`.

:func:`main` is the only place that turns failures into exit codes: a
:class:`~thinpool.errors.ThinpoolError` becomes one line ``thinpool: <message>`` and its
``exit_code``; a click usage error one line and 2; anything unexpected one line, a hint about
``--debug`` and 1. ``--debug`` (or ``THINPOOL_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMAND_MODULES = ("pools", "volumes", "info", "data", "tools")

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
    import click

    from thinpool.errors import ThinpoolError

    from . import app, output

    args = _wait_args(sys.argv[1:] if argv is None else list(argv))
    app.DEBUG = os.environ.get("THINPOOL_DEBUG", "") not in ("", "0")
    code = 1
    try:
        rv = load_commands().main(args=args, prog_name="thinpool", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except ThinpoolError as e:
        _traceback(app.DEBUG)
        output.error(str(e))
        code = e.exit_code
    except click.ClickException as e:
        _traceback(app.DEBUG)
        output.error(_usage_line(e))
        code = e.exit_code
    except click.Abort:
        output.error("aborted")
        code = 1
    except SystemExit as e:           # click exits this way on a broken stdout pipe
        code = e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        output.error("interrupted")
        code = 130
    except BrokenPipeError:
        code = 1
    except Exception as e:  # noqa: BLE001 - the last resort: one line, no traceback
        _traceback(app.DEBUG)
        if app.DEBUG:
            output.error(f"unexpected error: {type(e).__name__}: {e}")
        else:
            output.error(f"unexpected error: {type(e).__name__}: {e} "
                         f"(run with --debug for a traceback)")
        code = 1
    return _finish(code)


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
    """Flush stdout; a reader that went away (``| head``) is not an error worth a traceback."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return code or 1
    return code

"""The command group, its session and the pieces every command module shares.

* :data:`cli` is the click group. A command module registers its commands on it
  (``@cli.command()``) and is listed in :data:`thinpool.cli.COMMAND_MODULES`; nothing else needs
  to change to add a command group.
* :class:`Session` (``@pass_session``) knows the pools' home directory and is the one place that
  opens and locks a pool for a command: ``with session.pool(name, write=True) as pool``. Opening
  for writing takes the pool's exclusive lock; leaving the block normally commits, an exception
  closes the pool without committing, so a failed command leaves the pool as it was.
* Parameter types turn text into checked values before any pool is opened: :data:`SIZE`
  (``thinpool.units.parse_size``), :data:`POOL`, :data:`VOLUME` (``POOL/NAME``) and
  :data:`TARGET` (``POOL[/NAME]``). Bad text is a usage error (exit code 2).

Errors are raised, never printed here: :func:`thinpool.cli.main` turns them into one line and an
exit code. Nothing in this module imports rich.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click

from thinpool.errors import (AlreadyExists, BusyError, InvalidArgument, MetadataError, NotFound,
                             ThinpoolError)
from thinpool.paths import CONFIG_NAME          # the file that makes a directory a pool
from thinpool.units import format_size, parse_size

from . import output

if TYPE_CHECKING:
    from thinpool import Pool, Volume

#: Set by the group callback; read by main() to decide whether to print a traceback.
DEBUG = False


class NotConfirmed(ThinpoolError):
    """The user did not confirm a destructive command."""

    exit_code = 1


# -- where pools live ------------------------------------------------------------------------
def default_home() -> Path:
    """``$XDG_DATA_HOME/thinpool``, else ``~/.local/share/thinpool``."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "thinpool"


_POOL_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_.+@:-]{0,127}$")


def check_pool_name(name: str) -> str:
    """A pool name is one path component: 1-128 of ``A-Z a-z 0-9 _ . + - @ :``, not starting
    with ``.`` or ``-`` (so never empty, ``.``, ``..`` or anything with ``/``)."""
    if not _POOL_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid pool name {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . + - @ :, "
            f"not starting with '.' or '-'")
    return name


@dataclass(frozen=True)
class Target:
    """``POOL`` or ``POOL/VOLUME`` from the command line."""

    pool: str
    volume: str | None = None

    def __str__(self) -> str:
        return self.pool if self.volume is None else f"{self.pool}/{self.volume}"


def parse_target(text: str, *, volume: bool | None) -> Target:
    """``volume``: True requires ``POOL/NAME``, False forbids it, None allows either."""
    pool, sep, name = text.partition("/")
    check_pool_name(pool)
    if not sep:
        if volume:
            raise InvalidArgument(f"{text!r} names a pool; give a volume as POOL/NAME")
        return Target(pool)
    if volume is False:
        raise InvalidArgument(f"{text!r} names a volume; give a pool name only")
    from thinpool.registry import check_name
    check_name(name)
    return Target(pool, name)


# -- parameter types -------------------------------------------------------------------------
class _LibraryParam(click.ParamType):
    """A click type whose conversion raises InvalidArgument; that becomes a usage error."""

    def _parse(self, value: str):
        raise NotImplementedError

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except InvalidArgument as e:
            self.fail(str(e), param, ctx)


class SizeParam(_LibraryParam):
    name = "size"

    def _parse(self, value: str) -> int:
        return parse_size(value)


class TargetParam(_LibraryParam):
    def __init__(self, name: str, volume: bool | None):
        self.name = name
        self.volume = volume

    def _parse(self, value: str) -> Target:
        return parse_target(value, volume=self.volume)


SIZE = SizeParam()
POOL = TargetParam("pool", volume=False)
VOLUME = TargetParam("pool/volume", volume=True)
TARGET = TargetParam("pool[/volume]", volume=None)


# -- the session: home directory, opening pools ------------------------------------------------
class Session:
    def __init__(self, home: Path):
        self.home = home

    def pool_path(self, name: str) -> Path:
        return self.home / check_pool_name(name)

    def pool_exists(self, name: str) -> bool:
        return (self.pool_path(name) / CONFIG_NAME).is_file()

    def pool_names(self) -> list[str]:
        """Every pool in the home directory, sorted by name."""
        try:
            entries = sorted(os.listdir(self.home))
        except FileNotFoundError:
            return []
        return [n for n in entries
                if _POOL_NAME.fullmatch(n) and (self.home / n / CONFIG_NAME).is_file()]

    def require_pool(self, name: str) -> Path:
        path = self.pool_path(name)
        if not (path / CONFIG_NAME).is_file():
            raise NotFound(f"no pool named {name!r} in {self.home}; "
                           f"'thinpool list' shows the pools there")
        return path

    @contextmanager
    def pool(self, name: str, *, write: bool = False) -> Iterator["Pool"]:
        """Open and lock pool ``name`` for one command.

        ``write=False`` takes a shared lock (other readers may run alongside), ``write=True`` the
        exclusive one. A clean exit commits (writers); an exception closes without committing.
        """
        path = self.require_pool(name)
        from thinpool import Pool
        try:
            pool = Pool.open(path, read_only=not write)
        except BusyError as e:
            pid = e.holder_pid
            who = f"process {pid}{_describe_process(pid)}" if pid else "another process"
            raise BusyError(f"pool {name!r} is in use by {who}; wait for it to finish or stop it, "
                            f"then try again", holder_pid=pid) from e
        except MetadataError as e:
            raise MetadataError(f"pool {name!r} does not open: {e} (its metadata is damaged; "
                                f"'thinpool check {name}' examines it)") from e
        seen = len(pool.notes)
        for note in pool.notes:
            output.note(f"pool {name}: {note}")
        try:
            with pool:
                yield pool
        finally:
            for note in pool.notes[seen:]:      # what the command itself ran into
                output.warn(f"pool {name}: {note}")


def _describe_process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return ""
    cmd = " ".join(" ".join(a.decode(errors="replace") for a in argv if a).split())
    if len(cmd) > 60:
        cmd = cmd[:57] + "..."
    return f" ({cmd})" if cmd else ""


pass_session = click.make_pass_decorator(Session)


# -- helpers commands share -----------------------------------------------------------------
def get_volume(pool: "Pool", target: Target) -> "Volume":
    if target.volume not in pool.volumes():
        raise NotFound(f"no volume {target.volume!r} in pool {target.pool!r}; "
                       f"'thinpool stat {target.pool}' lists its volumes")
    return pool.volume(target.volume)


def refuse_existing_volume(pool: "Pool", target: Target) -> None:
    if target.volume in pool.volumes():
        raise AlreadyExists(f"volume {str(target)!r} exists already; choose another name "
                            f"or delete it first with 'thinpool delete {target}'")


def warn_if_overcommitted(pool: "Pool") -> None:
    """LVM's warning: the volumes' virtual sizes add up to more than the pool's data space."""
    st = pool.stat()
    virtual = sum(v.size for v in st.volumes)
    real = st.data_blocks_total * st.block_size
    if virtual > real:
        output.warn(f"sum of all thin volume sizes ({format_size(virtual)}) exceeds the size of "
                    f"pool {st.name} ({format_size(real)}); the pool is overcommitted")


def confirm(question: str, yes: bool) -> None:
    """Ask ``question`` on the terminal unless ``yes``; raise NotConfirmed on anything but yes.

    Only a terminal is asked: with stdin not a terminal (a script, a pipe) and no ``yes`` the
    answer is no, so piped data is never taken for consent. Ctrl-C at the question is an
    interrupt (exit 130)."""
    if yes:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise NotConfirmed(f"{question.rstrip('?')}: not without a terminal to ask on; "
                           f"nothing was changed (pass --yes to go ahead)")
    try:
        ok = click.confirm(question, default=False, err=True)
    except click.Abort as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None
        output.echo_err()
        ok = False
    if not ok:
        raise NotConfirmed("not confirmed; nothing was changed (pass --yes to skip the question)")


# -- the group -------------------------------------------------------------------------------
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="THINPOOL_HOME",
              show_envvar=True,
              help="Directory holding the pools [default: ~/.local/share/thinpool].")
@click.option("--debug", is_flag=True, help="Print a traceback when a command fails.")
@click.version_option(package_name="thinpool", prog_name="thinpool")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, debug: bool) -> None:
    """Thin-provisioned block device pools in the Linux dm-thin metadata format.

    Pools live in --home (or $THINPOOL_HOME); volumes are named POOL/NAME. Sizes take bytes,
    K/M/G/T/P or KiB..PiB (powers of 1024), kB/MB/GB/TB/PB (powers of 1000) and s (512-byte
    sectors).

    Exit codes: 0 success, 1 failure, 2 bad usage or argument, 3 metadata corrupt, 4 out of
    space, 5 busy, 130 interrupted (SIGINT), 141 stdout's reader went away, 143 terminated.
    """
    global DEBUG
    DEBUG = DEBUG or debug
    ctx.obj = Session(home if home is not None else default_home())

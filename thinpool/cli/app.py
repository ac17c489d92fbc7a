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
                             PoolDamaged, ThinpoolError)
from thinpool.locking import process_command
from thinpool.paths import is_pool_dir          # what makes a directory a pool
from thinpool.units import format_size, parse_size

from . import output

if TYPE_CHECKING:
    from thinpool import Pool, Volume

#: Set by the group callback; read by main() to decide whether to print a traceback.
DEBUG = False
#: A question was answered yes at the terminal during this command (a command sent to a pool's
#: thinpool serve takes the answer along: :mod:`.forward`).
CONFIRMED = False


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


class RelativeSizeParam(SizeParam):
    """A size, or ``+SIZE`` / ``-SIZE`` relative to the current one (as ``lvextend -L +10G``):
    returns ``(sign, bytes)`` with sign ``""``, ``"+"`` or ``"-"``."""

    name = "[+|-]size"

    def _parse(self, value: str) -> tuple[str, int]:
        sign = value[:1] if value[:1] in ("+", "-") else ""
        return sign, parse_size(value[len(sign):])


def resolve_size(given: tuple[str, int], current: int, what: str) -> int:
    """The absolute size ``given`` (from RelativeSizeParam) means for something ``current``
    bytes large; InvalidArgument when it comes to zero or less."""
    sign, amount = given
    if not sign:
        return amount
    new = current + amount if sign == "+" else current - amount
    if new <= 0:
        raise InvalidArgument(f"{what} is {format_size(current)} ({current} bytes): taking "
                              f"{format_size(amount)} from it leaves nothing")
    return new


SIZE = SizeParam()
RELATIVE_SIZE = RelativeSizeParam()
POOL = TargetParam("pool", volume=False)
VOLUME = TargetParam("pool/volume", volume=True)
TARGET = TargetParam("pool[/volume]", volume=None)


# -- the session: home directory, opening pools ------------------------------------------------
class Session:
    def __init__(self, home: Path):
        self.home = home
        #: How long a writer waits for another writer (``--wait[=SECONDS]``): 0 not at all,
        #: None as long as it takes.
        self.wait: float | None = 0

    def pool_path(self, name: str) -> Path:
        return self.home / check_pool_name(name)

    def pool_exists(self, name: str) -> bool:
        return is_pool_dir(self.pool_path(name))

    def pool_names(self) -> list[str]:
        """Every pool in the home directory, sorted by name."""
        try:
            entries = sorted(os.listdir(self.home))
        except FileNotFoundError:
            return []
        return [n for n in entries if _POOL_NAME.fullmatch(n) and is_pool_dir(self.home / n)]

    def require_pool(self, name: str) -> Path:
        path = self.pool_path(name)
        if not is_pool_dir(path):
            raise NotFound(f"no pool named {name!r} in {self.home}; "
                           f"'thinpool list' shows the pools there")
        return path

    def busy(self, name: str, pid: int | None) -> BusyError:
        """The one-line error for a pool another process is changing (served by ``thinpool
        serve``: which process, and how to stop it)."""
        served = self._served_by(name, pid)
        if served is not None:
            return BusyError(f"pool {name!r} is being served by thinpool serve (process {pid}, "
                             f"on {served.get('socket')}); stop it with 'thinpool serve {name} "
                             f"--stop' first", holder_pid=pid)
        who = f"process {pid}{process_command(pid)}" if pid else "another process"
        hint = ("; pass --wait to wait for it (--wait=SECONDS for at most that long)"
                if self.wait == 0 else
                f" (waited {self.wait:g} s)" if self.wait is not None else "")
        return BusyError(f"pool {name!r} is in use by {who}{hint}", holder_pid=pid)

    def _served_by(self, name: str, pid: int | None) -> dict | None:
        """The state of the ``thinpool serve`` holding pool ``name`` if ``pid`` is that."""
        if not pid:
            return None
        from thinpool.export.state import read_state
        state = read_state(self.pool_path(name))
        return state if state is not None and state.get("pid") == pid else None

    def _forwardable(self, name: str, pid: int | None) -> bool:
        """Whether this command goes to the ``thinpool serve`` holding pool ``name``
        (:mod:`.forward`)."""
        from . import forward
        ctx = click.get_current_context(silent=True)
        while ctx is not None and ctx.parent is not None and ctx.parent.parent is not None:
            ctx = ctx.parent            # a group's subcommand goes by its group's name
        return (ctx is not None and ctx.info_name in forward.FORWARDED and pid is not None
                and self._served_by(name, pid) is not None)

    def refuse_if_busy(self, name: str) -> None:
        """Fail now, as opening it for writing would, if another process is changing the pool
        (and --wait was not given): before a command spends time on its input."""
        from thinpool.config import pool_files
        from thinpool.locking import writer_of
        pid = writer_of(pool_files(self.require_pool(name))[0])
        if pid is not None and self.wait == 0:
            raise self.busy(name, pid)

    @contextmanager
    def pool(self, name: str, *, write: bool = False, quiet: bool = False) -> Iterator["Pool"]:
        """Open and lock pool ``name`` for one command.

        ``write=False`` takes a shared lock (other readers may run alongside), ``write=True`` the
        exclusive one. A clean exit commits (writers); an exception closes without committing.
        """
        path = self.require_pool(name)
        from thinpool import Pool

        from . import forward
        held = forward.HELD
        if held is not None and held.holds(path):      # run for others by its thinpool serve
            yield held.pool
            if write:
                held.pool.commit()
                held.pool.write_names()
            return
        try:
            pool = Pool.open(path, read_only=not write, wait=self.wait if write else 0)
        except BusyError as e:
            if write and held is None and self._forwardable(name, e.holder_pid):
                raise forward.Forward(path, e.holder_pid, self.home) from None
            raise self.busy(name, e.holder_pid) from e
        except PoolDamaged as e:
            raise PoolDamaged(f"pool {name!r} does not open: {e}", e.path) from e
        except MetadataError as e:
            raise MetadataError(damage_message(name, path, e, opened=False)) from e
        # A command is the pool's only user in this process: nobody else could free space
        # while it waits, so a write that finds the pool full fails at once (exit 4).
        pool.wait_for_space = False
        pool.reader_wait_hook = lambda pids: output.note(
            f"pool {name}: waiting for {_readers(pids)} to finish reading before committing")
        seen = len(pool.notes)
        for note in () if quiet else pool.notes:
            output.note(f"pool {name}: {note}")
        marked = False
        try:
            with pool:
                try:
                    yield pool
                except MetadataError as e:
                    # Damage a command found reading the pool marks it for a check (damage.py).
                    marked = pool.report_damage(e)
                    raise MetadataError(damage_message(name, path, e, opened=True,
                                                       marked=marked)) from e
        finally:
            for note in () if quiet else pool.notes[seen:]:   # what the command ran into
                output.warn(f"pool {name}: {note}")
            if marked and not write:
                _flag_needs_check(path)


def damage_message(name: str, path: Path, e: MetadataError, *, opened: bool,
                   marked: bool = False) -> str:
    """One line for damaged metadata: which file, what is wrong, which command helps."""
    from thinpool.config import pool_files
    try:
        mpath = str(pool_files(path)[0])
    except ThinpoolError:
        mpath = "its metadata"
    what = " does not open" if not opened else ""
    stop = ("; writes to it are stopped until 'thinpool check {0}' finds it clean" if marked or
            not opened else "").format(name)
    return (f"pool {name!r}{what}: its metadata {mpath} is damaged ({e}){stop}; "
            f"'thinpool check {name}' examines it and 'thinpool repair -i {name} -o FILE' "
            f"rebuilds what is readable")


def _flag_needs_check(path: Path) -> None:
    """A reader marked the pool: if no writer holds it, open it for writing, which turns the
    marker into NEEDS_CHECK in the superblock (damage.py). Busy or unopenable: the marker
    stays, and the next writer's open does it."""
    from thinpool import Pool
    try:
        Pool.open(path).close()
    except ThinpoolError:
        pass


def _readers(pids: list[int]) -> str:
    if not pids:
        return "a reader"
    return ", ".join(f"process {p}{process_command(p)}" for p in pids[:3]) + (
        f" and {len(pids) - 3} more" if len(pids) > 3 else "")


def _wait_seconds(ctx: click.Context, param, value):
    """``--wait`` (as long as it takes) or ``--wait=SECONDS`` into the session."""
    if value is None:
        return None
    if value == "forever":
        wait = None
    else:
        try:
            wait = float(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a number of seconds (write it as "
                                     f"--wait=SECONDS, with the '=')", ctx, param) from None
        if not 0 <= wait < 1e9:
            raise click.BadParameter(f"{value!r}: give 0 or more seconds", ctx, param)
    session = ctx.find_object(Session)
    if session is not None:
        session.wait = wait
    return None


#: Added to every command by :func:`thinpool.cli.load_commands`.
WAIT_OPTION = click.Option(
    ["--wait"], is_flag=False, flag_value="forever", default=None, metavar="[=SECONDS]",
    expose_value=False, callback=_wait_seconds,
    help="If another command is changing the pool, wait for it (at most SECONDS) instead of "
         "failing with exit 5.")


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
    global CONFIRMED
    from . import forward
    if yes or (forward.HELD is not None and forward.HELD.confirmed):
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
    CONFIRMED = True


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

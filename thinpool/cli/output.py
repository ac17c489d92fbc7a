"""The CLI's one output gateway: every byte a command prints goes through here.

* Results go to **stdout**: :func:`echo` (lines), :func:`emit_json` (``--json``; exact integers,
  snake_case keys), :func:`fields` and :func:`table` (for people), :func:`write_data` (raw bytes,
  e.g. ``thinpool read``).
* Diagnostics go to **stderr**: :func:`note`, :func:`warn` and :func:`error`, each one line
  starting with ``thinpool:``.
* Tables and progress bars use rich, imported only when one is drawn, so ``--json`` and plain
  commands never pay for it. A command with ``--json`` emits and returns before it builds any table.
* :func:`progress` draws a bar (bytes done, speed, time left) only when stderr is a terminal;
  otherwise it is a silent counter.

**When stdout cannot take the output** (closed, a full device such as ``/dev/full``, a pipe whose
reader went away): :func:`guard_stdout` (installed by :func:`thinpool.cli.main` around every
command) turns the OSError of any write to stdout -- ours, click's, rich's -- into
:class:`StdoutError`, whose exit code is 4 for a full device, 141 for a reader that went away
(as a process killed by SIGPIPE; no message) and 1 otherwise. A command whose stdout *is* its
result (read, dump, ls, stat, ...) fails that way. :func:`echo` is different: it prints the one
line a command says about what it did, after it did it; if stdout cannot take that line, the
line goes to stderr as a warning and the command still succeeds, since its work is done.
"""

from __future__ import annotations

import errno
import json
import re
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

from thinpool.errors import ThinpoolError

PREFIX = "thinpool"

#: Exit code of a command whose stdout reader went away (``| head``): 128 + SIGPIPE, what a
#: shell reports for a process killed by SIGPIPE (``cat``, ``dd``).
EXIT_PIPE_CLOSED = 141


class StdoutError(ThinpoolError):
    """Stdout did not take the output: full (exit 4), reader gone (141, quiet), closed (1)."""

    def __init__(self, err: OSError):
        self.errno = err.errno
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            self.exit_code = 4
            why = "no space left on the device it goes to"
        elif err.errno == errno.EPIPE:
            self.exit_code = EXIT_PIPE_CLOSED
            why = "the reader went away"
        elif err.errno == errno.EBADF:
            self.exit_code = 1
            why = "it is closed (redirect it to /dev/null to drop the output)"
        else:
            self.exit_code = 1
            why = err.strerror or str(err)
        super().__init__(f"cannot write to stdout: {why}")

    @property
    def quiet(self) -> bool:
        return self.errno == errno.EPIPE


class _Guarded:
    """A stdout (text, or its binary ``buffer``) whose write errors are StdoutError."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, data):
        try:
            return self._stream.write(data)
        except OSError as e:
            raise StdoutError(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise StdoutError(e) from None

    @property
    def buffer(self) -> _Guarded:
        return _Guarded(self._stream.buffer)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _Closed:
    """What stdout is when the process started with descriptor 1 closed (``>&-``)."""

    encoding = "utf-8"
    errors = "strict"

    def write(self, data):
        raise OSError(errno.EBADF, "Bad file descriptor")

    def flush(self) -> None:            # nothing is ever pending
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    @property
    def buffer(self) -> _Closed:
        return self


def guard_stdout(stream):
    """``stream`` (sys.stdout; None when descriptor 1 was closed) wrapped so that every failed
    write raises :class:`StdoutError`."""
    return _Guarded(_Closed() if stream is None else stream)


def unguard_stdout(stream):
    """The stream :func:`guard_stdout` wrapped (None again for a closed descriptor 1)."""
    inner = getattr(stream, "_stream", stream) if isinstance(stream, _Guarded) else stream
    return None if isinstance(inner, _Closed) else inner


# -- stdout ----------------------------------------------------------------------------------
_echo_failed = False


def start() -> None:
    """Forget the previous command's stdout trouble (main() runs commands in one process too)."""
    global _echo_failed
    _echo_failed = False


def echo(text: str = "") -> None:
    """A line saying what the command did (see the module docstring: never fails the command)."""
    global _echo_failed
    if _echo_failed:
        warn(f"(stdout) {text}")
        return
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except StdoutError as e:
        _echo_failed = True
        _discard_pending()
        if not e.quiet:
            warn(f"{e}; the command's report follows here: {text}")


def _discard_pending() -> None:
    """Point stdout's descriptor at /dev/null and flush there what could not be written, so
    the failed report is not tried again at exit."""
    import os
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError, StdoutError):
        pass


def line(text: str = "") -> None:
    """A line of a command's result (a failed write fails the command)."""
    sys.stdout.write(text + "\n")


def write_text(text: str) -> None:
    """Text that is the command's result (XML, a table), as it is."""
    sys.stdout.write(text)


def emit_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def write_data(data: bytes | bytearray | memoryview) -> None:
    sys.stdout.buffer.write(data)


def flush() -> None:
    sys.stdout.flush()


def fields(title: str, pairs: Sequence[tuple[str, str]]) -> None:
    """A title line and aligned ``key  value`` lines (no rich needed)."""
    width = max((len(k) for k, _ in pairs), default=0)
    lines = [title] + [f"  {k:<{width}}  {v}" for k, v in pairs]
    sys.stdout.write("\n".join(lines) + "\n")


def table(title: str | None, columns: Sequence[tuple[str, str]],
          rows: Iterable[Sequence[str]], indent: int = 0) -> None:
    """A rich table on stdout. ``columns``: (header, "left" | "right"); numbers go right."""
    from rich import box
    from rich.padding import Padding
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False,
              pad_edge=False, header_style="bold")
    for header, justify in columns:
        t.add_column(header, justify=justify, no_wrap=True)
    for row in rows:
        t.add_row(*row)
    shown = Padding(t, (0, 0, 0, indent)) if indent else t
    console = _console(sys.stdout)
    if console.is_terminal:
        console.print(shown)
        return
    with console.capture() as captured:       # for pipes and files: no padding at line ends
        console.print(shown)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _console(file):
    """A rich console on ``file``; off a terminal, wide enough that no cell is cut."""
    from rich.console import Console
    wide = None if file.isatty() else 1000
    return Console(file=file, width=wide, highlight=False, soft_wrap=False)


# -- stderr ----------------------------------------------------------------------------------
# Control characters other than tab (C0, DEL, C1, the Unicode line and paragraph separators):
# echoed raw from an argument they would break the one line, or drive the terminal.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _line(text: str) -> str:
    """One line: newlines become spaces, other control characters escapes (``\\x1b``)."""
    joined = " ".join(str(text).split("\n"))
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], joined)


def _stderr(text: str) -> None:
    try:                               # a closed or full stderr has no better place to go
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def write_err_text(text: str) -> None:
    """Diagnostics another process produced (a command the pool's server ran), as they are."""
    _stderr(text)


def echo_err(text: str = "") -> None:
    _stderr(text + "\n")


def note(text: str) -> None:
    _stderr(f"{PREFIX}: {_line(text)}\n")


def warn(text: str) -> None:
    _stderr(f"{PREFIX}: warning: {_line(text)}\n")


def error(text: str) -> None:
    _stderr(f"{PREFIX}: {_line(text)}\n")


class _Counter:
    """What :func:`progress` yields: ``advance(n)`` bytes."""

    def __init__(self, bar=None, task=None):
        self._bar, self._task = bar, task
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)


@contextmanager
def progress(total: int, description: str) -> Iterator[_Counter]:
    """A byte progress bar on stderr while the block runs, if stderr is a terminal."""
    if not sys.stderr.isatty():
        yield _Counter()
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    from thinpool.units import format_size

    class SpeedColumn(ProgressColumn):            # rich's own prints decimal units
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            shown = "?" if speed is None else f"{format_size(int(speed))}/s"
            return Text(shown, style="progress.data.speed")

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  DownloadColumn(binary_units=True), SpeedColumn(),
                  TimeRemainingColumn(), console=_console(sys.stderr),
                  transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield _Counter(bar, task)


@contextmanager
def count_progress(total: int | None, description: str, unit: str) -> Iterator[_Counter]:
    """A progress bar counting items (devices, say) on stderr, if stderr is a terminal."""
    if not sys.stderr.isatty():
        yield _Counter()
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(unit), TimeRemainingColumn(), console=_console(sys.stderr),
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield _Counter(bar, task)

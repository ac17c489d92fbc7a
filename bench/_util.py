"""Helpers the benchmark modules share: how a benchmark says which table row it belongs to, the
external programs (qemu-img, qemu-io, the thin-provisioning-tools, thinpool's own command line)
and small file utilities.

Pairing (read by ``python -m bench``): every benchmark calls :func:`tag` once per table row it
belongs to. A row is a *workload*; it has one ``thinpool`` side and one ``baseline`` side, both
measured in the same run. The thinpool side carries the row's target. ``extra_info`` then holds
``workload``, ``side``, ``unit``, ``target`` (of the first row, as plain keys, for anyone reading
pytest-benchmark's JSON) and ``rows`` (all of them, for the runner).

Units say how the runner turns a benchmark's median round time into the figure it prints:

* ``MiB/s``: ``amount`` MiB per round / median time (higher is better);
* ``us/op``: median time / ``amount`` operations, in microseconds (lower is better);
* ``ms`` / ``s``: the median round time itself (lower is better);
* ``MiB``: not a time at all: ``value``, recorded by the benchmark (lower is better);
* ``KiB``: the same, for sizes on disk (bytes a change used): ``value`` KiB, no ``amount``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

import pytest

MiB = 2**20
GiB = 2**30

#: Units where a bigger figure is better; for every other unit smaller is better.
HIGHER_IS_BETTER = {"MiB/s", "ops/s"}

_TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def tag(benchmark, workload: str, side: str, unit: str, *, label: str, amount: float | None = None,
        value: float | None = None, target: str | None = None, target_ratio: float | None = None,
        target_max: float | None = None, times: list[float] | None = None) -> None:
    """Put this benchmark in table row ``workload`` as its ``side`` ("thinpool" or "baseline").

    ``label`` names what ran ("thinpool Volume.write", "os.pwrite", "qemu-io qcow2 64K"...).
    The thinpool side may carry the target: ``target`` (text as the issue words it) and either
    ``target_ratio`` (the ratio, > 1 meaning thinpool is better, must be at least this) or
    ``target_max`` (thinpool's own figure must stay below this, in ``unit``).

    ``times``: the side's round times in seconds when this benchmark timed them itself (see
    :func:`alternate`); the runner then takes the figure from them instead of the benchmark's
    own statistics."""
    if side not in ("thinpool", "baseline"):
        raise ValueError(f"side must be 'thinpool' or 'baseline', not {side!r}")
    row = {"workload": workload, "side": side, "unit": unit, "label": label}
    for key, val in (("amount", amount), ("value", value), ("target", target),
                     ("target_ratio", target_ratio), ("target_max", target_max), ("times", times)):
        if val is not None:
            row[key] = val
    info = benchmark.extra_info
    rows = info.setdefault("rows", [])
    rows.append(row)
    if len(rows) == 1:
        info.update({k: row[k] for k in ("workload", "side", "unit", "label")})
        if target is not None:
            info["target"] = target


def alternate(baseline: Callable[[], float], setup: Callable[[], object] | None = None):
    """Interleave a baseline with thinpool's rounds: returns ``(setup, times)`` for
    ``benchmark.pedantic(..., setup=setup)``. Before each thinpool round (warm-up rounds
    included) the setup runs one baseline round, ``baseline()``, which returns the seconds its
    measured part took, appends that to ``times``, then runs ``setup`` (thinpool's own).

    Why: on a shared machine the disk and the CPU change speed over seconds to minutes; with all
    of one side's rounds first, a slow spell lands on one side only. Side by side, round after
    round, both meet the same spells. Tag the baseline with ``times[warmup_rounds:]``."""
    times: list[float] = []

    def wrapped():
        times.append(baseline())
        return setup() if setup is not None else None

    return wrapped, times


def set_value(benchmark, value: float) -> None:
    """Record a figure that is not a time (peak memory) on every row of this benchmark."""
    for row in benchmark.extra_info.get("rows", []):
        row["value"] = value
    benchmark.extra_info["value"] = value


# -- programs ----------------------------------------------------------------------------------
def find_tool(name: str) -> str | None:
    """Absolute path of ``name`` on PATH or in the sbin directories (thin-provisioning-tools
    install there, off an ordinary user's PATH)."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *_TOOL_DIRS]))


def need_tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not found: install {package}")
    return path


def thinpool_argv() -> list[str]:
    """How a user starts thinpool: the console script installed beside this interpreter (not a
    pyenv shim, whose own start-up would be timed), else ``python -m thinpool``."""
    script = pathlib.Path(sys.executable).parent / "thinpool"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "thinpool"]


def run(argv: Sequence[str], *, stdout=subprocess.DEVNULL, input: str | None = None) -> None:
    """Run a program; raise with its stderr if it fails (a benchmark that did not do its work
    must not report a figure)."""
    r = subprocess.run(list(argv), stdout=stdout, stderr=subprocess.PIPE, input=input,
                       text=True if input is not None else None, check=False)
    if r.returncode != 0:
        err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
        raise AssertionError(f"{' '.join(map(str, argv[:4]))}... exited {r.returncode}: "
                             f"{err.strip()[-2000:]}")


def qemu_img_create(path: os.PathLike | str, size: int, cluster_size: int = 64 * 1024,
                    preallocation: str | None = None) -> None:
    opts = f"cluster_size={cluster_size}"
    if preallocation:
        opts += f",preallocation={preallocation}"
    run([need_tool("qemu-img", "qemu-utils"), "create", "-q", "-f", "qcow2", "-o", opts,
         os.fspath(path), str(size)])


def qemu_io_argv(path: os.PathLike | str, commands: Sequence[str]) -> list[str]:
    """One ``qemu-io`` process running ``commands`` in order on a qcow2 image, with the host page
    cache in writeback mode (qemu-io's default is writethrough, a flush after every write: not
    what the other sides do). qemu flushes the image when it closes it, at exit."""
    argv = [need_tool("qemu-io", "qemu-utils"), "-f", "qcow2", "-t", "writeback"]
    for c in commands:
        argv += ["-c", c]
    argv.append(os.fspath(path))
    return argv


#: Runs argv[3:] with its stdout in file argv[1] and its stdin from file argv[2] (or nothing:
#: "-"), waits for it and prints its rusage. A small, fresh process on purpose: a child's
#: ``ru_maxrss`` starts at the RSS of the process that forked it (Linux carries the pre-exec
#: high-water mark across exec), so measured straight from the benchmark process (hundreds of
#: MiB by then) every child would seem at least that big.
_LAUNCHER = """
import json, os, sys
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
inp = os.open(os.devnull if sys.argv[2] == "-" else sys.argv[2], os.O_RDONLY)
with open("/proc/self/status") as f:
    rss = [int(line.split()[1]) for line in f if line.startswith("VmHWM:")][0]
pid = os.fork()
if pid == 0:
    os.dup2(out, 1)
    os.dup2(inp, 0)
    os.execv(sys.argv[3], sys.argv[3:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
                  "launcher_rss_kib": rss}))
"""


def peak_rss(argv: Sequence[str], out_path: os.PathLike | str,
             stdin_path: os.PathLike | str | None = None) -> tuple[float, bytes]:
    """Run ``argv`` (its first element an absolute path) in a process of its own; its peak
    resident set in MiB (``ru_maxrss`` from ``wait4``) and its stdout. Raises if it fails."""
    import json
    r = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, os.fspath(out_path),
                        "-" if stdin_path is None else os.fspath(stdin_path), *argv],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise AssertionError(f"launcher failed: {r.stderr[-2000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if result["exit"] != 0:
        raise AssertionError(f"{argv[0]} exited {result['exit']}: {r.stderr[-2000:]}")
    # The child's high-water mark starts at the launcher's size (its VmHWM when it forked):
    # the figure is the child's own only if it is bigger.
    assert result["maxrss_kib"] > result["launcher_rss_kib"], result
    with open(out_path, "rb") as f:
        return result["maxrss_kib"] / 1024, f.read()


# -- files ---------------------------------------------------------------------------------------
def fsync_path(path: os.PathLike | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sparse_file(path: os.PathLike | str, size: int) -> pathlib.Path:
    """A new file of ``size`` bytes that holds no data (one hole)."""
    path = pathlib.Path(path)
    if path.exists():
        path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def remove(*paths: os.PathLike | str) -> None:
    """Remove files and directories if they exist (benchmarks clean up their big files)."""
    for p in paths:
        p = pathlib.Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

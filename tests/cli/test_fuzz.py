"""Every command, hostile arguments and hostile environments (issue 11).

The commands are enumerated from the click group, so a new command is covered without a change
here. For each one a *base* command line is built from its parameters (a pool, a volume, an
input or output file, the first choice, ...), then a fixed table of variants:

* each parameter in turn replaced by hostile values for its type: huge, negative, empty and
  malformed sizes; names with ``/``, ``..``, surrogate-escaped bytes, 200 characters; paths that
  are missing, in missing or read-only directories, directories, a pool's own files; bad choices
  and numbers; flags switched on;
* the base line against a home that does not exist, and one that is a file;
* the base line with stdout closed, stdout on ``/dev/full`` and stdout a pipe whose reader is
  gone (all real: ``None``, the device, ``os.pipe()``), run in process through
  :func:`thinpool.cli.main` for speed;
* the base line as a real process receiving SIGINT while it runs (50 ms after ``main()``
  began: depending on the command it lands in the imports, in click, or in the work; ``write``
  waits for more input by then).

Each run must end with no traceback, no "unexpected error" and an exit code from the documented
list (:data:`thinpool.cli.EXIT_CODES`); when it failed, every file under the test directory (the
home with its pools, and the input files) is byte for byte as before and no file appeared or
vanished. After a SIGINT the pool passes both oracles and its volumes read as before (an
interrupted write may have put bytes into data blocks it never mapped).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from tests.cli.helpers import THINPOOL, clean_env, default_sigint
from tests.cli.test_bad_input import World
from tests.tptools import assert_checks_pass, requires_tools
from thinpool import Pool
from thinpool.cli import EXIT_CODES, load_commands, main
from thinpool.cli.app import SizeParam, TargetParam

MiB = 1 << 20
COMMANDS = load_commands().commands

# -- base command lines, from each command's parameters ----------------------------------------
# Values a parameter takes in the base line when its type alone does not say (by command and
# parameter name); everything else comes from the type.
BASE_VALUES = {("restore", "input_"): "{F}/valid.xml", ("restore", "output_"): "{F}/out.meta",
               ("repair", "input_"): "demo", ("repair", "output_"): "{F}/out.meta",
               ("delta", "left"): "vol0", ("delta", "right"): "snap0",
               ("diff", "a"): "demo/snap0", ("diff", "b"): "demo/vol0",
               ("import", "file"): "{F}/zeros.img", ("snapshot", "name"): "snapnew",
               ("revert", "snap"): "snap0", ("merge", "target"): "demo/snap0",
               ("create", "size"): "1M", ("resize", "size"): "2M",
               ("metadata-size", "block_size"): "64K", ("metadata-size", "pool_size"): "1G",
               ("metadata-size", "max_thins"): "10", ("ls", "fields"): "DEV",
               # serve without --stop serves until stopped: every variant asks for a stop
               ("serve", "stop"): True}


def base_value(cmd: str, p: click.Parameter) -> str | None:
    if (cmd, p.name) in BASE_VALUES:
        return BASE_VALUES[(cmd, p.name)]
    t = p.type
    if isinstance(t, TargetParam):
        return "demo" if t.volume is False else "demo/vol0"
    if isinstance(t, click.Choice):
        return str(t.choices[0])
    if isinstance(t, click.Path):
        return "{F}/zeros.img" if t.exists else "{F}/out.img"
    if isinstance(p, click.Argument) or p.required:
        return "demo" if isinstance(t, click.types.StringParamType) else "1"
    return None


def argv_for(cmd: str, values: dict[str, str | bool | None]) -> list[str]:
    """The command line for parameter values by name (None: left out; True: a flag given)."""
    params = [p for p in COMMANDS[cmd].params if p.name != "help"]
    args = [values.get(p.name) for p in params if isinstance(p, click.Argument)]
    argv = [cmd] + [a for a in args if a is not None]
    for p in params:
        if isinstance(p, click.Option):
            v = values.get(p.name)
            if v is True:
                argv.append(p.opts[0])
            elif v is not None and v is not False:
                argv += [p.opts[0], v]
    return argv


def base_values(cmd: str) -> dict:
    return {p.name: base_value(cmd, p) for p in COMMANDS[cmd].params if p.name != "help"}


# -- hostile values, by parameter type ---------------------------------------------------------
SIZES = ["99999999999999999999P", "-1", "", "0", "1", str(2**64), "12Q", "9223372036854775296",
         "+99999999999999999999P", "-99999999999999999999P", "+", "+-1M"]
TARGETS = ["", "demo/..", "../x", "demo/a/b", "nope", "demo/nope", "demo/\udcff", "x" * 200,
           "demo/vol0", "demo"]
PATHS = ["", "{F}/missing/x", "{F}/missing", "/proc/version", "/sys/thinpool-nope", "{F}/dir",
         "{H}/demo/data", "{H}/demo/metadata", "{H}/demo/./names.json", "{F}/existing.img",
         "{F}/garbage.bin", "-"]
STRINGS = ["", "\udcff", "x" * 300, "-", "..", "demo/vol0", "99999999999999999999"]
NUMBERS = ["-1", "nan", "1e400", "", "99999999999999999999", "0"]
CHOICES = ["", "bogus"]


def hostile(p: click.Parameter) -> list[str | bool]:
    t = p.type
    if isinstance(p, click.Option) and p.is_flag:
        return [True]
    if isinstance(t, SizeParam):
        return SIZES
    if isinstance(t, TargetParam):
        return TARGETS
    if isinstance(t, click.Path):
        return PATHS
    if isinstance(t, click.Choice):
        return CHOICES
    if isinstance(t, (click.types.FloatParamType, click.types.IntParamType)):
        return NUMBERS
    return STRINGS + PATHS[:3]


def variants() -> list[tuple[str, list[str]]]:
    out = []
    for cmd in sorted(COMMANDS):
        base = base_values(cmd)
        out.append((cmd, argv_for(cmd, base)))
        for p in COMMANDS[cmd].params:
            if p.name == "help":
                continue
            for v in hostile(p):
                out.append((cmd, argv_for(cmd, {**base, p.name: v})))
    return out


VARIANTS = variants()
SIGINT_DELAY = 0.05          # seconds after main() began: its imports, click, or the work


# -- running ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    os.environ.pop("THINPOOL_DEBUG", None)
    w = World(tmp_path_factory.mktemp("fuzz") / "w")
    w.root.mkdir()
    w.build()
    with Pool.open(w.home / "demo") as pool:
        pool.configure(error_if_no_space=True)      # a full pool fails at once, never waits
    import shutil
    shutil.rmtree(w.pristine)
    shutil.copytree(w.root, w.pristine)
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("fuzz-cwd"))   # relative outputs never land in the checkout
    try:
        yield w
    finally:
        os.chdir(old)


def run(home: Path, argv: list[str], stdout: str = "pipe", stdin: bytes = b"x" * 100):
    """``thinpool --home HOME ARGV`` in process; ``stdout``: pipe (kept), closed, full
    (/dev/full) or broken (a pipe whose reader is gone)."""
    err = io.BytesIO()
    fake_err = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace",
                                write_through=True)
    fake_in = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    held = []
    if stdout == "pipe":
        fake_out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    elif stdout == "closed":
        fake_out = None
    elif stdout == "full":
        fake_out = open("/dev/full", "w", encoding="utf-8")       # noqa: SIM115
        held.append(fake_out)
    else:
        r, w = os.pipe()
        os.close(r)
        fake_out = open(w, "w", encoding="utf-8")                  # noqa: SIM115
        held.append(fake_out)
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = fake_in, fake_out, fake_err
    try:
        code = main(["--home", str(home), *argv])
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        for f in held:
            try:
                f.close()
            except OSError:
                pass
    return code, err.getvalue().decode("utf-8", errors="replace")


def check(world: World, argv, code: int, err: str, before: dict) -> None:
    what = f"thinpool {' '.join(map(repr, argv))} -> exit {code}, stderr {err!r}"
    assert code in EXIT_CODES, what
    assert "Traceback" not in err and "unexpected error" not in err, what
    if code != 0:
        after = world.fingerprint()
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"{what}: changed {changed}"


def _one(world, argv, stdout="pipe", home=None):
    argv = world.expand(argv)
    before = world.fingerprint()
    try:
        code, err = run(home or world.home, argv, stdout)
        check(world, argv, code, err, before)
        return code, err
    finally:
        _stop_served(world.home)
        if world.fingerprint() != before:
            world.reset()


def _stop_served(home: Path) -> None:
    """A variant that attached a volume (``attach``) leaves the pool served, by a process of
    its own: detach what it attached and stop it (killed by pid if it does not go)."""
    from thinpool.export.state import ask, pid_alive, read_state
    pool = home / "demo"
    state = read_state(pool) if pool.is_dir() else None
    if state is None:
        return
    from thinpool.errors import ThinpoolError
    try:
        try:
            for v in state.get("volumes", ()):
                if v.get("attached"):
                    ask(pool, {"op": "detach", "volume": v["name"]})
            ask(pool, {"op": "stop"})
        except ThinpoolError:       # stopping already (its control socket is gone)
            pass
        deadline = time.monotonic() + 30
        while pid_alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        if pid_alive(state["pid"]):
            os.kill(state["pid"], signal.SIGKILL)


def test_every_command_is_covered():
    assert {c for c, _ in VARIANTS} == set(COMMANDS)
    assert len(VARIANTS) > 10 * len(COMMANDS)


def test_hostile_arguments(world):
    for cmd, argv in VARIANTS:
        _one(world, argv)


@pytest.mark.parametrize("stdout", ["closed", "full", "broken"])
def test_hostile_stdout(world, stdout):
    for cmd in sorted(COMMANDS):
        argv = argv_for(cmd, base_values(cmd))
        code, err = _one(world, argv, stdout)
        if stdout == "broken":          # quiet about the pipe (notes about the pool may come)
            said = [ln for ln in err.splitlines()
                    if not ln.startswith(("thinpool: note:", "thinpool: warning:"))]
            assert not said or code not in (0, 141), (argv, code, err)


def test_hostile_home(world, tmp_path):
    (tmp_path / "a-file").write_bytes(b"not a directory")
    for home in (tmp_path / "no-home", tmp_path / "a-file", tmp_path / "missing" / "h"):
        for cmd in sorted(COMMANDS):
            code, _ = _one(world, argv_for(cmd, base_values(cmd)), home=home)
            if code != 0:
                assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], (cmd, home)
    assert (tmp_path / "a-file").read_bytes() == b"not a directory"


@requires_tools
def test_sigint_mid_run(world):
    for cmd in sorted(COMMANDS):
        argv = world.expand(argv_for(cmd, base_values(cmd)))
        before = world.fingerprint()
        reads = _volume_bytes(world.home)
        default_sigint()
        p = subprocess.Popen([*THINPOOL, "--home", str(world.home), *argv],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=clean_env())
        try:
            p.stdin.write(b"y" * 1000)
            p.stdin.flush()
            _wait_until_in_main(p)
            time.sleep(SIGINT_DELAY)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        _stop_served(world.home)
        err = err.decode(errors="replace")
        what = f"{argv} -> {p.returncode}: {err!r}"
        assert p.returncode in EXIT_CODES and "Traceback" not in err, what
        assert "unexpected error" not in err, what
        if p.returncode == 130:
            assert err.endswith("thinpool: interrupted\n"), what
            assert_checks_pass(world.home / "demo" / "metadata")
            assert _volume_bytes(world.home) == reads, what
        if world.fingerprint() != before:
            world.reset()


def _wait_until_in_main(p, timeout: float = 30.0) -> None:
    """Until ``p`` runs thinpool.cli.main, which catches SIGTERM (the interpreter's own start-up,
    before any thinpool code runs, is no place to test an interrupt)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.002)


def _volume_bytes(home: Path) -> dict[str, bytes]:
    with Pool.open(home / "demo", read_only=True) as pool:
        return {n: pool.volume(n).read(0, pool.volume(n).size) for n in pool.volumes()}

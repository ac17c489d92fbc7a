"""Bad input on the command line: random arguments never get a traceback, always a documented exit
code, and a command that fails changes no file.

Hypothesis (derandomized) builds argument lists for create, snapshot, write, read, resize, delete,
stat, dump, restore, ls and delta from pools of hostile values: size strings (valid and invalid:
``12Q``, ``-5G``, ``1.5.5G``, huge, empty, non-ASCII), names with ``/``, ``..``, spaces, trailing
newlines and undecodable bytes (as argv carries them: surrogate escapes), huge offsets and
negative lengths, dump files that are truncated or garbage. Most run in-process through
:func:`thinpool.cli.main` (the console script's entry point) for speed; a handful run as the
installed console script. For each:

* the exit code is one of the documented ones (0-5), stderr has no traceback and no "unexpected
  error" (the last-resort message for bugs);
* a failure prints exactly one line on stderr, ``thinpool: ...``; a success may add warnings;
* when the command failed, or only reads, the sha256 of every file under the test directory
  (the pools and the dump/restore files) is unchanged, and no file appeared or vanished.

NUL cannot be passed in argv; names with NUL go through the library API instead.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.helpers import tp
from thinpool import Pool
from thinpool.cli import main
from thinpool.errors import InvalidArgument, ThinpoolError
from thinpool.units import parse_size

MiB = 1 << 20
CODES = {0, 1, 2, 3, 4, 5}
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")

# -- the fixture: a home with pool demo (vol0, snap0) and files for dump/restore ----------------


class World:
    """The test directory: ``home/`` (pools) and ``files/`` (dumps, images, outputs)."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.files = root / "files"
        self.pristine = root.parent / (root.name + "-pristine")

    def build(self) -> None:
        with Pool.create(self.home / "demo", data_size=4 * MiB) as pool:
            pool.create_thin("vol0", MiB).write(0, b"hello" * 1000)
            pool.snapshot("vol0", "snap0")
            pool.volume("vol0").write(70000, b"changed")
        f = self.files
        f.mkdir()
        (f / "dir").mkdir()
        assert main(["--home", str(self.home), "dump", "demo", "-o", str(f / "valid.xml")]) == 0
        assert main(["--home", str(self.home), "dump", "demo", "--format", "json",
                     "-o", str(f / "valid.json")]) == 0
        xml = (f / "valid.xml").read_bytes()
        (f / "cut.xml").write_bytes(xml[: len(xml) // 2])
        (f / "cut.json").write_bytes((f / "valid.json").read_bytes()[:100])
        (f / "empty.xml").write_bytes(b"")
        (f / "garbage.bin").write_bytes(bytes(range(256)) * 20)
        (f / "bad-elem.xml").write_bytes(xml.replace(b"<device ", b"<gadget ", 1))
        (f / "huge-run.xml").write_bytes(
            b'<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
            b'data_block_size="128" nr_data_blocks="100000000000000">\n'
            b'<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">\n'
            b'<range_mapping origin_begin="0" data_begin="0" length="10000000000000" time="0"/>\n'
            b'</device>\n</superblock>\n')
        (f / "deep.json").write_bytes(b'{"superblock": ' + b"[" * 100000 + b"]" * 100000 + b"}")
        (f / "existing.img").write_bytes((self.home / "demo" / "metadata").read_bytes())
        (f / "zeros.img").write_bytes(bytes(8192))
        shutil.copytree(self.root, self.pristine)

    def reset(self) -> None:
        shutil.rmtree(self.root)
        shutil.copytree(self.pristine, self.root)

    def fingerprint(self) -> dict[str, str]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for d in dirnames:
                out[os.path.relpath(os.path.join(dirpath, d), self.root) + "/"] = "dir"
            for name in filenames:
                p = os.path.join(dirpath, name)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, self.root)] = hashlib.sha256(fh.read()).hexdigest()
        return out

    def expand(self, argv: list[str]) -> list[str]:
        return [a.replace("{F}", str(self.files)).replace("{H}", str(self.home)) for a in argv]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    os.environ.pop("THINPOOL_DEBUG", None)
    w = World(tmp_path_factory.mktemp("bad-input") / "w")
    w.root.mkdir()
    w.build()
    return w


def run_inprocess(home: Path, argv: list[str], stdin: bytes = b"") -> tuple[int, bytes, str]:
    """``thinpool --home HOME ARGV`` through thinpool.cli.main with stdio as a terminal-less
    process has them (stdout strict UTF-8, stderr backslashreplace)."""
    out, err = io.BytesIO(), io.BytesIO()
    fake_in = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    fake_out = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    fake_err = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = fake_in, fake_out, fake_err
    try:
        code = main(["--home", str(home), *argv])
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue().decode("utf-8", errors="replace")


# -- hostile values ----------------------------------------------------------------------------
BAD_SIZES = ["12Q", "-5G", "1.5.5G", "", " ", "G", "1e3", "inf", "nan", "-0", "+5G", "１２",
             "12\u00a0K", "1,000", "0x10", "1.1K", "0.5s", ".5K", "1.", "5 G B", "1K1", "½", "٣",
             "1_000", "−5G", "10 PB PB", "1\udcff", "\udcff", "-1", "9" * 400 + "Q"]
GOOD_SIZES = ["0", "1", "512", "4096", "64K", "1M", "1.5M", "768K", "2048s", "1MB", " 1 M ",
              "\t1M", "1GiB", "100G", "1T", "10P", "1000P", str(2**64), str(2**70), "9" * 60]
# Pool data/metadata sizes that are quick to try (a valid huge pool takes seconds to format).
POOL_SIZES = BAD_SIZES + ["0", "1", "64K", "1M", "2M", "4M", "8M", "1P", "1000P", str(2**70),
                          "100000P"]
NAMES = ["vol0", "snap0", "new1", "..", ".", "", "a b", "-v", ".v", "vol0\n", "new\n", "x" * 128,
         "x" * 129, "a/b", "ü", "vol0 ", " vol0", "new:1@x+y.z", "\udcff", "a\tb", "vol0/..",
         "../../etc", "~", "*", "new\r", "\x1b[2J", "a\x1eb", "a\x85b"]
POOLS = ["demo", "nope", "..", ".", "", "-x", ".hidden", "demo\n", "dé", "a b", "x" * 129,
         "demo ", "new2", "\udcfe", "~"]
OFFSETS = ["0", "1", "-1", "-5", "4096", "1M", "2M", "1048576", "1048577", "1048575",
           str(2**63), str(2**64), "99999999999999999999999P", "1e9", "-0", "5000", "70000"]
PATHS = ["{F}/valid.xml", "{F}/valid.json", "{F}/cut.xml", "{F}/cut.json", "{F}/empty.xml",
         "{F}/garbage.bin", "{F}/bad-elem.xml", "{F}/huge-run.xml", "{F}/deep.json",
         "{F}/existing.img", "{F}/zeros.img", "{F}/dir", "{F}/missing", "{F}/missing/x",
         "{H}/demo/metadata", "{H}/demo/data", "demo", "", "-"]
OUT_PATHS = ["{F}/out.img", "{F}/out2", "{F}/existing.img", "{F}/zeros.img", "{F}/dir",
             "{F}/missing/out.img", "demo", "", "{F}/out\udcff"]
# Arbitrary text, as argv can carry it (no NUL; lone surrogates only as surrogate escapes).
text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=10)

size = st.one_of(st.sampled_from(GOOD_SIZES), st.sampled_from(BAD_SIZES), text)
pool_size = st.one_of(st.sampled_from(["4M", "8M", "1M", "64K"]), st.sampled_from(POOL_SIZES),
                      text.filter(lambda s: not _huge_valid(s)))
offset = st.one_of(st.sampled_from(OFFSETS), st.integers(-(2**65), 2**65).map(str),
                   st.integers(0, MiB).map(str))
name = st.one_of(st.sampled_from(["vol0", "snap0", "new1"]), st.sampled_from(NAMES), text)
pool_name = st.one_of(st.just("demo"), st.sampled_from(POOLS), text)
volume = st.builds(lambda p, v: f"{p}/{v}", st.one_of(st.just("demo"), st.sampled_from(POOLS)), name)
target = st.one_of(volume, st.sampled_from(["demo/vol0", "demo/snap0", "demo/new1"]), pool_name)
source = st.one_of(st.just("demo"), st.sampled_from(PATHS), pool_name)


def _huge_valid(s: str) -> bool:
    try:
        return parse_size(s) > 64 * MiB
    except InvalidArgument:
        return False


def opt(flag: str, values) -> st.SearchStrategy:
    """Nothing, or ``[flag, value]``."""
    return st.one_of(st.just([]), values.map(lambda v: [flag, v]))


def often(flag: str, values) -> st.SearchStrategy:
    """``[flag, value]``, or (one time in ten) nothing."""
    return st.sampled_from([True] * 9 + [False]).flatmap(
        lambda yes: values.map(lambda v: [flag, v]) if yes else st.just([]))


@st.composite
def command(draw) -> tuple[str, list[str], bytes]:
    """(command name, argv after --home, stdin)."""
    kind = draw(st.sampled_from(["create", "snapshot", "write", "read", "resize", "delete", "stat",
                                 "dump", "restore", "ls", "delta"]))
    stdin = b""
    if kind == "create":
        t = draw(target)
        if "/" in t:
            argv = [t] + draw(often("--size", size)) + draw(opt("--block-size", size))
        else:
            argv = ([t] + draw(often("--size", pool_size)) + draw(opt("--block-size", pool_size))
                    + draw(opt("--metadata-size", pool_size)))
    elif kind == "snapshot":
        argv = [draw(target), draw(name)]
    elif kind == "write":
        argv = [draw(target)] + draw(opt("--offset", offset))
        stdin = draw(st.binary(max_size=3000))
    elif kind == "read":
        argv = [draw(target)] + draw(opt("--offset", offset)) + draw(opt("--length", offset))
    elif kind == "resize":
        t = draw(target)
        sizes = size if "/" in t else pool_size
        argv = [t] + draw(often("--size", sizes)) + draw(opt("--metadata-size", pool_size))
    elif kind == "delete":
        argv = [draw(target)]
    elif kind == "stat":
        argv = [draw(target)] + draw(st.sampled_from([[], ["--json"]]))
    elif kind == "dump":
        argv = ([draw(source)] + draw(opt("--format", st.sampled_from(["xml", "json", "yaml", ""])))
                + draw(opt("--dev-id", name)) + draw(opt("-o", st.sampled_from(OUT_PATHS))))
    elif kind == "restore":
        argv = (["-i", draw(st.sampled_from(PATHS)), "-o", draw(st.sampled_from(OUT_PATHS))]
                + draw(opt("--metadata-size", pool_size)))
    elif kind == "ls":
        argv = [draw(source)] + draw(opt("-o", st.one_of(
            st.sampled_from(["DEV", "NAME,MAPPED", "dev,,", "BOGUS", "", ",", "DEV,BOGUS"]), text)))
    else:
        argv = [draw(source), "--snap1", draw(name), "--snap2", draw(name)]
    if draw(st.sampled_from([False] * 9 + [True])):      # sometimes stray extra arguments
        argv += draw(st.lists(st.one_of(text, st.sampled_from(["--", "-x", "--json", "--size"])),
                              min_size=1, max_size=2))
    return kind, [kind, *argv], stdin


READ_ONLY = {"read", "stat", "ls", "delta"}


def changes_nothing(kind: str, argv: list[str]) -> bool:
    return kind in READ_ONLY or (kind == "dump" and "-o" not in argv)


def check_result(world: World, kind: str, argv: list[str], code: int, err: str,
                 before: dict, after: dict) -> None:
    what = f"thinpool {' '.join(map(repr, argv))} -> exit {code}, stderr {err!r}"
    assert code in CODES, what
    assert "Traceback" not in err, what
    assert "unexpected error" not in err, what
    # Lines end in "\n"; no other control character (say, one echoed from an argument) may
    # split a line or drive the terminal.
    assert not CONTROL.search(err), what
    lines = err.splitlines()
    assert all(line.startswith("thinpool: ") for line in lines), what
    if code != 0:
        assert len(lines) == 1 and err.endswith("\n"), what
    if code != 0 or changes_nothing(kind, argv):
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"{what}: changed {changed}"


# -- the tests ------------------------------------------------------------------------------------
@settings(derandomize=True, database=None, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cmd=command())
def test_random_arguments(world, cmd):
    kind, argv, stdin = cmd
    argv = world.expand(argv)
    before = world.fingerprint()
    try:
        code, _, err = run_inprocess(world.home, argv, stdin)
        after = world.fingerprint()
        check_result(world, kind, argv, code, err, before, after)
    finally:
        if world.fingerprint() != before:
            world.reset()


@settings(derandomize=True, database=None, max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["create", "resize"]), t=volume, s=size)
def test_size_errors_are_usage_errors(world, kind, t, s):
    """An invalid size is always exit 2, whatever else is wrong."""
    try:
        parse_size(s)
        valid = True
    except InvalidArgument:
        valid = False
    before = world.fingerprint()
    try:
        code, _, err = run_inprocess(world.home, [kind, t, "--size", s])
        check_result(world, kind, [kind, t, "--size", s], code, err, before, world.fingerprint())
        if not valid:
            assert code == 2, (kind, t, s, code, err)
    finally:
        if world.fingerprint() != before:
            world.reset()


SUBPROCESS_CASES = [
    (["create", "demo/new", "--size", "12Q"], b"", 2),
    (["create", "demo/../x", "--size", "1M"], b"", 2),
    (["create", "..", "--size", "4M"], b"", 2),
    (["create", "demo/a b", "--size", "1M"], b"", 2),
    (["write", "demo/vol0", "--offset", "-5"], b"x", 2),
    (["write", "demo/vol0", "--offset", str(2**64)], b"x", 2),
    (["read", "demo/vol0", "--length", "-1"], b"", 2),
    (["read", "demo/vol0", "--offset", "1M", "--length", "1"], b"", 2),
    (["resize", "demo/vol0", "--size", "1.5.5G"], b"", 2),
    (["snapshot", "demo/vol0", "../evil"], b"", 2),
    (["restore", "-i", "{F}/cut.xml", "-o", "{F}/out.img"], b"", 2),
    (["dump", "{F}/garbage.bin"], b"", 3),
]


@pytest.mark.parametrize("argv,stdin,code", SUBPROCESS_CASES, ids=[" ".join(c[0]) for c in SUBPROCESS_CASES])
def test_console_script(world, argv, stdin, code):
    """A few of the same through the installed console script, as a real process."""
    argv = world.expand(argv)
    before = world.fingerprint()
    try:
        r = tp(world.home, *argv, input=stdin)
        check_result(world, argv[0], argv, r.returncode, r.stderr, before, world.fingerprint())
        assert r.returncode == code, (argv, r.returncode, r.stderr)
    finally:
        if world.fingerprint() != before:
            world.reset()


def test_console_script_undecodable_argv(world):
    """Bytes that are not UTF-8 reach Python's argv as surrogate escapes: still one clean line."""
    import subprocess

    from tests.cli.helpers import THINPOOL, clean_env
    before = world.fingerprint()
    for args in ([b"create", b"demo/\xff\xfe", b"--size", b"1M"], [b"create", b"demo/v", b"--size", b"1\xffM"],
                 [b"stat", b"\xff"], [b"dump", b"/nonexistent/\xff"]):
        r = subprocess.run([os.fsencode(a) for a in THINPOOL] + [b"--home", os.fsencode(world.home), *args],
                           capture_output=True, env=clean_env(), timeout=60)
        err = r.stderr.decode(errors="replace")
        check_result(world, "create", [a.decode(errors="replace") for a in args], r.returncode, err,
                     before, world.fingerprint())
        assert r.returncode != 0, (args, err)


@pytest.mark.parametrize("bad", ["a\0b", "\0", "vol0\0", "a\0/../b", "ok\n", "ok\r", "a\n\n"])
def test_library_names_with_control_characters(world, bad):
    """NUL cannot travel in argv; the library refuses it (and other control characters) as a
    name, for create_thin and snapshot, and changes nothing."""
    before = world.fingerprint()
    try:
        with Pool.open(world.home / "demo") as pool:
            with pytest.raises(InvalidArgument):
                pool.create_thin(bad, MiB)
            with pytest.raises(InvalidArgument):
                pool.snapshot("vol0", bad)
            with pytest.raises(ThinpoolError):
                pool.volume(bad)
            assert bad not in pool.volumes()
        assert world.fingerprint() == before
    finally:
        if world.fingerprint() != before:
            world.reset()


def test_library_pool_path_with_nul(tmp_path):
    with pytest.raises((ThinpoolError, ValueError)):
        Pool.create(tmp_path / "a\0b", data_size=4 * MiB)
    with pytest.raises(ThinpoolError):
        Pool.open(tmp_path / "a\0b")
    assert list(tmp_path.iterdir()) == []


# -- known library bugs ---------------------------------------------------------------------------
def _files(root: Path) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every file; files past 64 MiB (sparse, grown by a bug) by size only."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            n = p.stat().st_size
            out[str(p.relative_to(root))] = (n, hashlib.sha256(p.read_bytes()).hexdigest()
                                             if n <= 64 * MiB else "big")
    return out


@pytest.fixture
def small_home(tmp_path):
    with Pool.create(tmp_path / "demo", data_size=4 * MiB) as pool:
        pool.create_thin("vol0", MiB).write(0, b"x")
    return tmp_path


def test_pool_resize_past_metadata_changes_nothing(small_home):
    """Growing the data space beyond what the metadata can map fails (out of metadata space,
    exit 4) - and must leave the pool as it was: data file size, metadata, mode."""
    before = _files(small_home)
    code, _, err = run_inprocess(small_home, ["resize", "demo", "--size", "1T"])
    assert code == 4 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    assert _files(small_home) == before
    with Pool.open(small_home / "demo") as pool:
        assert not pool.stat().needs_check


@pytest.mark.parametrize("argv", [["create", "big", "--size", "4M", "--metadata-size", "1P"],
                                  ["resize", "demo", "--size", "8M", "--metadata-size", "1P"]])
def test_metadata_size_past_the_limit(small_home, argv):
    before = _files(small_home)
    code, _, err = run_inprocess(small_home, argv)
    assert code in (1, 2) and "unexpected error" not in err and len(err.splitlines()) == 1, (code, err)
    assert _files(small_home) == before

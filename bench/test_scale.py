"""Cost independent of pool size (workload 10, issue 11): commands on an empty 15 TiB pool
against the same commands on a 1 GiB pool, as whole processes in the same run.

Two homes, each with one pool ``p`` (64 KiB blocks, default metadata size: 2 MiB for 1 GiB,
11.25 GiB sparse for 15 TiB) and one volume ``v`` of 1 GiB, made once per module by
``thinpool create`` (the 15 TiB data file is sparse; the module is skipped where the file
system refuses it, naming the limit). The commands, started as a user starts them (the console
script beside this interpreter):

* ``stat p``;
* ``create p/vN --size 1G``, a new volume each round;
* ``write p/v --offset N`` of 1 byte from stdin (``--offset`` moves each round, so every round
  writes into a block never written before: an allocation, a bitmap change, a commit);
* ``snapshot p/v sN``, a new snapshot each round.

Time rows (10a-d): the 15 TiB command is the thinpool side, the same command on 1 GiB the
baseline; target: within 1.3x (ratio >= 1/1.3). Memory rows (10e-h): the peak resident set
(``ru_maxrss`` of the command's own process, ``_util.peak_rss``) of each side, measured
in alternation within one benchmark (two rounds each, the larger figure); target: at most
64 MiB above the 1 GiB figure of the same run (``target_max``). Row 10i: ``thinpool create p
--size 15T`` against ``--size 1G``, a new pool each round (the previous one removed, untimed);
target: under 2 s.
"""

from __future__ import annotations

import itertools
import os

import pytest

from ._util import peak_rss, remove, run, tag, thinpool_argv

SIZES = {"15 TiB": "15T", "1 GiB": "1G"}
ROUNDS = 10
CREATE_ROUNDS = 5
MEM_ROUNDS = 2
TARGET_RATIO = 1 / 1.3
MEM_SLACK_MIB = 64.0


def _tp(home, *args: str) -> list[str]:
    return thinpool_argv() + ["--home", str(home), *args]


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    out = {}
    for label, size in SIZES.items():
        home = tmp_path_factory.mktemp("scale")
        try:
            run(_tp(home, "create", "p", "--size", size))
        except AssertionError as e:
            remove(home, *out.values())
            if "allows files of at most" in str(e):
                pytest.skip(f"the file system under {home} cannot hold a {label} sparse file: {e}")
            raise
        run(_tp(home, "create", "p/v", "--size", "1G"))
        out[label] = home
    yield out
    remove(*out.values())


#: What each command does in round ``n`` (a new name or a new block every time).
COMMANDS = {
    "stat": lambda n: (["stat", "p"], None),
    "create POOL/VOL": lambda n: (["create", f"p/v{n}", "--size", "1G"], None),
    "1-byte write": lambda n: (["write", "p/v", "--offset", str(n * 65536 + 100)], "x"),
    "snapshot": lambda n: (["snapshot", "p/v", f"s{n}"], None),
}
LETTERS = dict(zip(COMMANDS, "abcd"))
MEM_LETTERS = dict(zip(COMMANDS, "efgh"))


def _workload(cmd: str) -> str:
    return f"10{LETTERS[cmd]}. {cmd}: empty 15 TiB pool vs 1 GiB (whole process)"


def _mem_workload(cmd: str) -> str:
    return f"10{MEM_LETTERS[cmd]}. peak memory, {cmd}: 15 TiB pool vs 1 GiB"


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.benchmark(group="10 scale")
def test_scale_command(benchmark, homes, cmd, size):
    home = homes[size]
    if size == "15 TiB":
        tag(benchmark, _workload(cmd), "thinpool", "ms", label=f"thinpool {cmd}, 15 TiB pool",
            target="within 1.3x of the 1 GiB pool", target_ratio=TARGET_RATIO)
    else:
        tag(benchmark, _workload(cmd), "baseline", "ms", label=f"thinpool {cmd}, 1 GiB pool")
    counter = itertools.count(1)
    argv: list = []

    def setup():
        args, stdin = COMMANDS[cmd](next(counter))
        argv[:] = [_tp(home, *args), stdin]

    def once():
        run(argv[0], input=argv[1])

    benchmark.pedantic(once, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.benchmark(group="10 scale, peak memory")
def test_scale_memory(benchmark, homes, cmd, tmp_path):
    stdin = tmp_path / "in"
    stdin.write_bytes(b"x")
    peaks: dict[str, list[float]] = {s: [] for s in SIZES}
    counter = itertools.count(1000)

    def once():
        n = next(counter)
        for size in SIZES:                       # side by side, round after round
            args, data = COMMANDS[cmd](n)
            peak, _ = peak_rss(_tp(homes[size], *args), tmp_path / "out",
                               stdin if data else None)
            peaks[size].append(peak)

    benchmark.pedantic(once, rounds=MEM_ROUNDS)
    big, small = max(peaks["15 TiB"]), max(peaks["1 GiB"])
    tag(benchmark, _mem_workload(cmd), "thinpool", "MiB", label=f"thinpool {cmd}, 15 TiB pool",
        value=big, target=f"at most {MEM_SLACK_MIB:g} MiB above the 1 GiB pool",
        target_max=small + MEM_SLACK_MIB)
    tag(benchmark, _mem_workload(cmd), "baseline", "MiB", label=f"thinpool {cmd}, 1 GiB pool",
        value=small)
    benchmark.extra_info["peaks_mib"] = peaks


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.benchmark(group="10 scale, create the pool")
def test_scale_create_pool(benchmark, size, tmp_path):
    workload = "10i. thinpool create POOL --size 15T vs --size 1G"
    if size == "15 TiB":
        tag(benchmark, workload, "thinpool", "s", label="thinpool create p --size 15T",
            target="under 2 s", target_max=2.0)
    else:
        tag(benchmark, workload, "baseline", "s", label="thinpool create p --size 1G")
    home = tmp_path / "home"

    def setup():
        remove(home)                             # the previous round's pool, untimed
        os.makedirs(home)

    def once():
        run(_tp(home, "create", "p", "--size", SIZES[size]))

    try:
        benchmark.pedantic(once, setup=setup, rounds=CREATE_ROUNDS, warmup_rounds=1)
    except AssertionError as e:
        if "allows files of at most" in str(e):
            pytest.skip(f"the file system under {tmp_path} cannot hold a {size} sparse file: {e}")
        raise
    finally:
        remove(home)

"""``thinpool restore|check|dump|ls`` against ``thin_restore|thin_check|thin_dump|thin_ls`` on the
same metadata with 1,000,000 mappings (workload 7).

The metadata is ``metadata_1m``: four devices, one a diverged snapshot of another, 40 % single
blocks and 60 % runs (``_metadata.mixed_xml``), written by the real ``thin_restore`` into a 64 MiB
file. Both sides are whole processes started the way a user starts them (thinpool's console
script beside this interpreter, so no pyenv shim), output to /dev/null; so thinpool's figures
include Python's start-up and its imports (about 0.3 s here: see ``test_startup.py``).

* ``restore``: ``-i`` the generated XML ``-o`` a new 64 MiB sparse file made before each round
  (untimed); afterwards the last output is checked with ``thin_check``.
* ``check``: the image; both must exit 0.
* ``dump``: the image as XML (thinpool's is byte for byte thin_dump's).
* ``ls``: ``-o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS`` on both sides (exclusive and
  shared blocks are what costs: every device's mappings are counted against every other's).
"""

from __future__ import annotations

import pytest

from ._util import need_tool, remove, run, sparse_file, tag, thinpool_argv

ROUNDS = {"restore": 3, "check": 5, "dump": 5, "ls": 5}
LS_FIELDS = "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS"
TARGETS = {
    "restore": ("within 2x of thin_restore", 0.5),
    "check": ("no slower than thin_check", 1.0),
    "dump": ("no slower than thin_dump", 1.0),
    "ls": (None, None),
}
TOOLS = ("restore", "check", "dump", "ls")


def _workload(tool: str) -> str:
    return f"7{'abcd'[TOOLS.index(tool)]}. {tool}, 1M mappings (whole process)"


def _argv(side: str, tool: str, big, out) -> list[str]:
    if side == "thinpool":
        prefix = thinpool_argv() + [tool]
    else:
        prefix = [need_tool(f"thin_{tool}", "thin-provisioning-tools")]
    image = str(big.image)
    return {
        "restore": prefix + ["-i", str(big.xml), "-o", str(out)],
        "check": prefix + [image],
        "dump": prefix + [image],
        "ls": prefix + ["-o", LS_FIELDS, image],
    }[tool]


@pytest.mark.parametrize("side", ("thinpool", "baseline"))
@pytest.mark.parametrize("tool", TOOLS)
def test_tool(benchmark, metadata_1m, tmp_path, tool, side):
    benchmark.group = f"7 tools: {tool}, 1M mappings"
    target, ratio = TARGETS[tool] if side == "thinpool" else (None, None)
    label = f"thinpool {tool}" if side == "thinpool" else f"thin_{tool} 0.9.0"
    tag(benchmark, _workload(tool), side, "s", label=label, target=target, target_ratio=ratio)
    out = tmp_path / "restored"
    argv = _argv(side, tool, metadata_1m, out)

    def setup():
        if tool == "restore":
            sparse_file(out, metadata_1m.metadata_size)
        return (argv,), {}

    try:
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS[tool], warmup_rounds=1)
        if tool == "restore":      # not a timing check: the output must be good metadata
            run([need_tool("thin_check", "thin-provisioning-tools"), str(out)])
    finally:
        remove(out)

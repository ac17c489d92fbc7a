"""Test support for comparing thinpool against Debian's thin-provisioning-tools.

The real ``thin_check``/``thin_dump``/``thin_restore``/``thin_ls``/``thin_delta``
(0.9.0) are used as an oracle.  This module provides:

* :data:`TOOLS_AVAILABLE` and the :data:`requires_tools` skip marker;
* :class:`XmlSuperblock` / :class:`XmlDevice`, an in-memory form of the
  ``thin_dump`` XML with every mapping expanded to one entry per virtual block;
* :func:`parse_xml` and :func:`to_xml`, where ``to_xml`` reproduces
  ``thin_dump`` 0.9.0's output byte for byte;
* :func:`random_superblock`, random pools that ``thin_restore`` accepts;
* thin wrappers that run the tools (:func:`thin_check`, :func:`thin_dump`,
  :func:`thin_restore`, :func:`thin_ls`, :func:`thin_delta`);
* access to the shared test vectors (:data:`TESTDATA`, :data:`TESTDATA_CASES`,
  :func:`testdata_image`).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import random
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union

import pytest

StrPath = Union[str, "os.PathLike[str]"]

# ---------------------------------------------------------------------------
# Locating the tools and the test vectors
# ---------------------------------------------------------------------------

#: Directories searched in addition to ``$PATH`` (the tools live in /usr/sbin,
#: which is not on an ordinary user's PATH).
_EXTRA_TOOL_DIRS: tuple[str, ...] = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _find_tool(name: str) -> str | None:
    """Return the absolute path of tool ``name``, or None if it is not installed."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_TOOL_DIRS])
    return shutil.which(name, path=search)


_TOOL_PATHS: dict[str, str | None] = {
    name: _find_tool(name)
    for name in ("thin_check", "thin_dump", "thin_restore", "thin_ls", "thin_delta")
}

#: True when thin_check, thin_dump and thin_restore are all installed.
TOOLS_AVAILABLE: bool = all(
    _TOOL_PATHS[name] is not None for name in ("thin_check", "thin_dump", "thin_restore")
)

#: Marker for tests that need the real tools.
requires_tools = pytest.mark.skipif(
    not TOOLS_AVAILABLE,
    reason="thin-provisioning-tools (thin_check, thin_dump, thin_restore) not installed",
)

#: The shared test vectors: ``<repo>/../shared/testdata``.
TESTDATA: pathlib.Path = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


def _list_cases(directory: pathlib.Path) -> list[str]:
    """Names of the cases in ``directory`` that have both an XML and an image."""
    if not directory.is_dir():
        return []
    return sorted(
        p.name[: -len(".xml")]
        for p in directory.glob("*.xml")
        if (directory / (p.name[: -len(".xml")] + ".img.gz")).is_file()
    )


#: Sorted case names (e.g. ``"01-single"``) found in :data:`TESTDATA`.
TESTDATA_CASES: list[str] = _list_cases(TESTDATA)


def testdata_xml(case: str) -> str:
    """Return the text of ``TESTDATA/CASE.xml``."""
    return (TESTDATA / f"{case}.xml").read_text()


def testdata_image(case: str, tmp_path: StrPath) -> pathlib.Path:
    """Gunzip ``TESTDATA/CASE.img.gz`` to ``tmp_path/CASE.img`` and return that path."""
    src = TESTDATA / f"{case}.img.gz"
    if not src.is_file():
        raise FileNotFoundError(f"no test vector image {src}")
    dest = pathlib.Path(tmp_path) / f"{case}.img"
    with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return dest


# These names start with "test"; stop pytest collecting them where imported.
testdata_xml.__test__ = False  # type: ignore[attr-defined]
testdata_image.__test__ = False  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# XML model
# ---------------------------------------------------------------------------


@dataclass
class XmlDevice:
    """One ``<device>`` element.

    ``mappings`` maps each virtual block to ``(data_block, time)``; ranges are
    expanded to one entry per block.
    """

    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    mappings: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass
class XmlSuperblock:
    """The ``<superblock>`` element; ``devices`` is keyed by ``dev_id``."""

    uuid: str
    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int
    nr_data_blocks: int
    devices: dict[int, XmlDevice] = field(default_factory=dict)


def _int_attr(elem: ET.Element, name: str, default: int | None = None) -> int:
    """Read a non-negative integer attribute, with a clear error if it is absent or bad."""
    raw = elem.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"<{elem.tag}> lacks required attribute {name!r}")
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise ValueError(f"<{elem.tag}> attribute {name}={raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"<{elem.tag}> attribute {name}={raw!r} is negative")
    return value


def _add_mapping(dev: XmlDevice, vblock: int, data_block: int, time: int) -> None:
    if vblock in dev.mappings:
        raise ValueError(f"device {dev.dev_id}: virtual block {vblock} is mapped twice")
    dev.mappings[vblock] = (data_block, time)


def parse_xml(text: str) -> XmlSuperblock:
    """Parse ``thin_dump``/``thin_restore`` XML into an :class:`XmlSuperblock`.

    ``range_mapping`` elements are expanded into per-block entries, so a range's
    length should be modest (it costs one dict entry per block).  As in
    ``thin_restore``, ``flags`` defaults to 0 and ``version`` to 1 when absent; a
    missing ``mapped_blocks`` defaults to the device's mapping count.  The
    ``metadata_snap`` attribute is accepted and ignored.  Raises ``ValueError`` on
    unknown elements, duplicate devices, a virtual block mapped twice in one device,
    or a zero-length range.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"malformed XML: {exc}") from None
    if root.tag != "superblock":
        raise ValueError(f"root element is <{root.tag}>, expected <superblock>")
    sb = XmlSuperblock(
        uuid=root.get("uuid", ""),
        time=_int_attr(root, "time"),
        transaction=_int_attr(root, "transaction"),
        flags=_int_attr(root, "flags", 0),
        version=_int_attr(root, "version", 1),
        data_block_size=_int_attr(root, "data_block_size"),
        nr_data_blocks=_int_attr(root, "nr_data_blocks"),
    )
    for dev_elem in root:
        if dev_elem.tag != "device":
            raise ValueError(f"unexpected element <{dev_elem.tag}> inside <superblock>")
        dev = XmlDevice(
            dev_id=_int_attr(dev_elem, "dev_id"),
            mapped_blocks=-1,
            transaction=_int_attr(dev_elem, "transaction"),
            creation_time=_int_attr(dev_elem, "creation_time"),
            snap_time=_int_attr(dev_elem, "snap_time"),
        )
        if dev.dev_id in sb.devices:
            raise ValueError(f"device {dev.dev_id} appears twice")
        for m in dev_elem:
            if m.tag == "single_mapping":
                _add_mapping(
                    dev,
                    _int_attr(m, "origin_block"),
                    _int_attr(m, "data_block"),
                    _int_attr(m, "time"),
                )
            elif m.tag == "range_mapping":
                vbegin = _int_attr(m, "origin_begin")
                dbegin = _int_attr(m, "data_begin")
                length = _int_attr(m, "length")
                time = _int_attr(m, "time")
                if length == 0:
                    raise ValueError(f"device {dev.dev_id}: range_mapping of length 0")
                for i in range(length):
                    _add_mapping(dev, vbegin + i, dbegin + i, time)
            else:
                raise ValueError(f"unexpected element <{m.tag}> inside <device>")
        dev.mapped_blocks = _int_attr(dev_elem, "mapped_blocks", len(dev.mappings))
        sb.devices[dev.dev_id] = dev
    return sb


def iter_runs(mappings: dict[int, tuple[int, int]]) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(origin_begin, data_begin, length, time)`` runs as thin_dump groups them.

    A run is a maximal sequence of consecutive virtual blocks mapped to
    consecutive data blocks with the same time, in increasing virtual order.
    """
    run: list[int] | None = None  # [vbegin, dbegin, length, time]
    for vblock in sorted(mappings):
        data_block, time = mappings[vblock]
        if (
            run is not None
            and vblock == run[0] + run[2]
            and data_block == run[1] + run[2]
            and time == run[3]
        ):
            run[2] += 1
            continue
        if run is not None:
            yield (run[0], run[1], run[2], run[3])
        run = [vblock, data_block, 1, time]
    if run is not None:
        yield (run[0], run[1], run[2], run[3])


def _quote(value: str) -> str:
    """Escape an attribute value (only matters for a non-empty uuid)."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")


def to_xml(sb: XmlSuperblock) -> str:
    """Format ``sb`` exactly as ``thin_dump`` 0.9.0 prints it.

    Devices come in increasing ``dev_id`` order and mappings in increasing
    virtual-block order; an empty device is an open/close tag pair, and the
    output ends with a newline.  ``mapped_blocks`` is printed as stored (not
    recomputed).
    """
    out: list[str] = [
        f'<superblock uuid="{_quote(sb.uuid)}" time="{sb.time}" transaction="{sb.transaction}"'
        f' flags="{sb.flags}" version="{sb.version}" data_block_size="{sb.data_block_size}"'
        f' nr_data_blocks="{sb.nr_data_blocks}">'
    ]
    for dev_id in sorted(sb.devices):
        dev = sb.devices[dev_id]
        out.append(
            f'  <device dev_id="{dev.dev_id}" mapped_blocks="{dev.mapped_blocks}"'
            f' transaction="{dev.transaction}" creation_time="{dev.creation_time}"'
            f' snap_time="{dev.snap_time}">'
        )
        for vbegin, dbegin, length, time in iter_runs(dev.mappings):
            if length == 1:
                out.append(
                    f'    <single_mapping origin_block="{vbegin}" data_block="{dbegin}"'
                    f' time="{time}"/>'
                )
            else:
                out.append(
                    f'    <range_mapping origin_begin="{vbegin}" data_begin="{dbegin}"'
                    f' length="{length}" time="{time}"/>'
                )
        out.append("  </device>")
    out.append("</superblock>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Random pools
# ---------------------------------------------------------------------------

#: Largest value of the 24-bit fields (device ids as the kernel limits them, times).
MAX_24BIT: int = (1 << 24) - 1


def _random_gaps(rng: random.Random, count: int, slack: int, zero_bias: float = 0.0) -> list[int]:
    """``count`` non-negative gaps whose sum is at most ``slack``.

    Each gap is forced to 0 with probability ``zero_bias`` (to make neighbours
    adjacent), which only lowers the sum.
    """
    if count == 0:
        return []
    cuts = sorted(rng.sample(range(slack + count), count))
    gaps = [cuts[0]] + [cuts[i] - cuts[i - 1] - 1 for i in range(1, count)]
    return [0 if rng.random() < zero_bias else g for g in gaps]


def _split_into_runs(rng: random.Random, total: int) -> list[int]:
    """Split ``total`` blocks into run lengths: many singles, short and some long runs."""
    lengths: list[int] = []
    while total > 0:
        r = rng.random()
        if r < 0.35:
            n = 1
        elif r < 0.9:
            n = rng.randint(2, 64)
        else:
            n = rng.randint(65, 700)
        n = min(n, total)
        lengths.append(n)
        total -= n
    return lengths


@dataclass
class _Extent:
    """A contiguous range of freshly allocated data blocks (placed later)."""

    length: int
    times: list[int]
    start: int = -1


def random_superblock(
    rng: random.Random,
    *,
    max_devices: int = 6,
    max_mappings: int = 3000,
    nr_data_blocks: int | None = None,
) -> XmlSuperblock:
    """Return a random pool that ``thin_restore`` 0.9.0 accepts and ``thin_check`` passes.

    * 0 to ``max_devices`` devices (zero devices about 8% of the time) with
      distinct ids in the 24-bit range, a mix of small and large ids; some
      devices are empty;
    * at most ``max_mappings`` mappings in total, laid out as runs and singles at
      scattered or adjacent virtual blocks (sometimes far apart);
    * data blocks are below ``nr_data_blocks`` and distinct within a device;
      devices may share data blocks with earlier devices (part of a run, or a
      whole earlier device, like a snapshot);
    * every time is in ``[0, time]``, ``creation_time <= snap_time <= time``,
      device transaction ids are at most the pool's; ``mapped_blocks`` equals
      the number of mappings;
    * ``data_block_size`` is a multiple of 128 in ``[128, 2097152]``,
      ``version`` 2, ``flags`` 0, ``uuid`` "".

    When ``nr_data_blocks`` is given, fresh (unshared) mappings are limited to
    that many blocks; otherwise it is chosen at least as large as needed
    (sometimes exactly, sometimes in the millions).
    """
    if max_devices < 0 or max_mappings < 0:
        raise ValueError("max_devices and max_mappings must be non-negative")
    if nr_data_blocks is not None and nr_data_blocks < 0:
        raise ValueError("nr_data_blocks must be non-negative")

    pool_time = rng.choice([0, rng.randint(0, 5), rng.randint(0, 1000), rng.randint(0, MAX_24BIT)])
    pool_trans = rng.choice([0, rng.randint(0, 50), rng.randint(0, (1 << 64) - 1)])
    data_block_size = 128 * rng.choice([1, 2, 8, rng.randint(1, 16384), 16384])

    if max_devices == 0 or rng.random() < 0.08:
        n_devices = 0
    else:
        n_devices = rng.randint(1, max_devices)
    dev_ids: list[int] = []
    while len(dev_ids) < n_devices:
        r = rng.random()
        if r < 0.5:
            candidate = rng.randint(0, 15)
        elif r < 0.8:
            candidate = rng.randint(0, 5000)
        else:
            candidate = rng.randint(0, MAX_24BIT)
        if r > 0.97:
            candidate = MAX_24BIT
        if candidate not in dev_ids:
            dev_ids.append(candidate)

    # Total mapping budget, skewed towards small pools.
    budget = rng.choice([rng.randint(0, 20), rng.randint(0, 300), rng.randint(0, max_mappings)])
    budget = min(budget, max_mappings)
    fresh_budget = budget if nr_data_blocks is None else min(budget, nr_data_blocks)

    def random_time() -> int:
        return rng.randint(0, pool_time)

    def new_extent(length: int) -> _Extent:
        times = [random_time()] * length
        if length >= 2 and rng.random() < 0.2:
            # Same data run, but the tail was written at another time.
            split = rng.randint(1, length - 1)
            tail = random_time()
            times[split:] = [tail] * (length - split)
        return _Extent(length, times)

    extents: list[_Extent] = []
    # Per device: ("copy", origin index) or list of (extent index, offset, length).
    plans: list[tuple[str, object]] = []
    plan_sizes: list[int] = []  # mappings each device will have
    remaining = budget
    remaining_fresh = fresh_budget
    for i in range(n_devices):
        copyable = [j for j in range(i) if 0 < plan_sizes[j] <= remaining]
        if copyable and rng.random() < 0.15:
            origin = rng.choice(copyable)
            plans.append(("copy", origin))
            plan_sizes.append(plan_sizes[origin])
            remaining -= plan_sizes[origin]
            continue
        if rng.random() < 0.2 or remaining == 0:
            plans.append(("runs", []))
            plan_sizes.append(0)
            continue
        want = rng.randint(1, remaining) if i < n_devices - 1 else remaining
        pieces: list[tuple[int, int, int]] = []
        # Shared slices of earlier devices' extents (like a snapshot's unchanged blocks).
        if extents and rng.random() < 0.5:
            for ext_idx in rng.sample(range(len(extents)), rng.randint(1, min(8, len(extents)))):
                if want == 0:
                    break
                ext = extents[ext_idx]
                offset = rng.randint(0, ext.length - 1)
                length = rng.randint(1, min(ext.length - offset, want))
                pieces.append((ext_idx, offset, length))
                want -= length
        fresh = min(want, remaining_fresh)
        for length in _split_into_runs(rng, fresh):
            extents.append(new_extent(length))
            pieces.append((len(extents) - 1, 0, length))
        remaining_fresh -= fresh
        size = sum(p[2] for p in pieces)
        remaining -= size
        plans.append(("runs", pieces))
        plan_sizes.append(size)

    # Place the fresh extents in data space, in random order with random gaps.
    fresh_total = sum(e.length for e in extents)
    if nr_data_blocks is None:
        slack = rng.choice(
            [0, rng.randint(0, 100), rng.randint(0, 10 * fresh_total + 1000), rng.randint(0, 4_000_000)]
        )
        nr_data_blocks = max(1, fresh_total + slack)
    order = list(range(len(extents)))
    rng.shuffle(order)
    gaps = _random_gaps(rng, len(order), nr_data_blocks - fresh_total, zero_bias=0.3)
    pos = 0
    for ext_idx, gap in zip(order, gaps):
        pos += gap
        extents[ext_idx].start = pos
        pos += extents[ext_idx].length
    assert pos <= nr_data_blocks

    sb = XmlSuperblock(
        uuid="",
        time=pool_time,
        transaction=pool_trans,
        flags=0,
        version=2,
        data_block_size=data_block_size,
        nr_data_blocks=nr_data_blocks,
    )
    built: list[dict[int, tuple[int, int]]] = []
    for dev_id, (kind, plan) in zip(dev_ids, plans):
        mappings: dict[int, tuple[int, int]] = {}
        if kind == "copy":
            assert isinstance(plan, int)
            mappings = dict(built[plan])
        else:
            assert isinstance(plan, list)
            pieces = list(plan)
            rng.shuffle(pieces)
            used = sum(p[2] for p in pieces)
            spread = rng.choice(
                [0, rng.randint(0, 2 * used + 10), rng.randint(0, 1 << 32), rng.randint(0, 1 << 40)]
            )
            vpos = 0
            for (ext_idx, offset, length), gap in zip(
                pieces, _random_gaps(rng, len(pieces), spread, zero_bias=0.25)
            ):
                vpos += gap
                ext = extents[ext_idx]
                for k in range(length):
                    mappings[vpos + k] = (ext.start + offset + k, ext.times[offset + k])
                vpos += length
        built.append(mappings)
        creation_time = random_time()
        sb.devices[dev_id] = XmlDevice(
            dev_id=dev_id,
            mapped_blocks=len(mappings),
            transaction=rng.randint(0, pool_trans),
            creation_time=creation_time,
            snap_time=rng.randint(creation_time, pool_time),
            mappings=mappings,
        )
    return sb


# ---------------------------------------------------------------------------
# Running the tools
# ---------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = _TOOL_PATHS.get(name) or _find_tool(name)
    if path is None:
        raise AssertionError(f"{name} is not installed (thin-provisioning-tools)")
    return path


def _run(name: str, args: Sequence[StrPath]) -> subprocess.CompletedProcess[str]:
    cmd = [_tool(name), *(os.fspath(a) for a in args)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _checked(name: str, args: Sequence[StrPath]) -> str:
    proc = _run(name, args)
    if proc.returncode != 0:
        raise AssertionError(
            f"{name} failed with exit status {proc.returncode}: {proc.args!r}\n"
            f"stderr:\n{proc.stderr}\nstdout:\n{proc.stdout[:2000]}"
        )
    return proc.stdout


def thin_check(path: StrPath, *args: StrPath) -> subprocess.CompletedProcess[str]:
    """Run ``thin_check [args] path``; never raises on a non-zero exit.

    On success 0.9.0 prints ``TRANSACTION_ID=…`` and ``METADATA_FREE_BLOCKS=…``
    on stdout and its progress lines (``examining superblock`` …) on stderr.
    """
    return _run("thin_check", [*args, path])


def assert_checks_pass(path: StrPath, *args: StrPath) -> None:
    """Both oracles agree the metadata is clean: the real ``thin_check [args]`` and ``thinpool
    check`` (which also recomputes data reference counts; thin_check 0.9.0 does not)."""
    from thinpool.tools.check import check
    r = thin_check(path, *args)
    assert r.returncode == 0, f"thin_check failed:\n{r.stderr}\n{r.stdout}"
    report = check(path)
    assert report.clean, [str(f) for f in report.errors]


def thin_dump(path: StrPath, *args: StrPath) -> str:
    """Run ``thin_dump [args] path`` and return its stdout; raises AssertionError on failure."""
    return _checked("thin_dump", [*args, path])


def thin_ls(path: StrPath, *args: StrPath) -> str:
    """Run ``thin_ls [args] path`` and return its stdout; raises AssertionError on failure."""
    return _checked("thin_ls", [*args, path])


def thin_delta(path: StrPath, *args: StrPath) -> str:
    """Run ``thin_delta [args] path`` and return its stdout; raises AssertionError on failure."""
    return _checked("thin_delta", [*args, path])


#: Bits per data-space-map bitmap block (2 bits per block in 4080 bytes).
_ENTRIES_PER_BITMAP: int = 4080 * 4
_MIB: int = 1 << 20


def metadata_size_for(xml_text: str) -> int:
    """A generous metadata file size (bytes) for restoring ``xml_text``.

    At least 4 MiB; otherwise 1 MiB plus 256 bytes per mapping, two blocks per
    device and two blocks per data-space-map bitmap, rounded up to 4 KiB.  It
    reads the numbers with regular expressions so it also works on XML that
    ``parse_xml`` would reject.
    """
    singles = len(re.findall(r"<single_mapping\b", xml_text))
    ranged = sum(
        int(m)
        for m in re.findall(r"<range_mapping\b[^>]*?\blength=\"(\d+)\"", xml_text)
    )
    devices = len(re.findall(r"<device\b", xml_text))
    m = re.search(r"<superblock\b[^>]*?\bnr_data_blocks=\"(\d+)\"", xml_text)
    nr_data = int(m.group(1)) if m else 0
    bitmaps = -(-nr_data // _ENTRIES_PER_BITMAP)
    size = _MIB + 256 * (singles + ranged) + 8192 * (devices + bitmaps)
    size = max(4 * _MIB, size)
    return -(-size // 4096) * 4096


def thin_restore(xml_text: str, out_path: StrPath, size_bytes: int | None = None) -> pathlib.Path:
    """Write ``xml_text`` to a fresh metadata image at ``out_path`` with ``thin_restore``.

    The output file is (re)created zero-filled and sized to ``size_bytes``, or to
    :func:`metadata_size_for` when None (thin_restore takes the metadata size
    from the file's size and refuses a file that does not exist).  Raises
    AssertionError with thin_restore's stderr if it fails.  Returns the path.
    """
    out = pathlib.Path(out_path)
    if size_bytes is None:
        size_bytes = metadata_size_for(xml_text)
    with open(out, "wb") as f:
        f.truncate(size_bytes)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".xml", prefix="thin_restore-", delete=False
    ) as tmp:
        tmp.write(xml_text)
        xml_path = tmp.name
    try:
        _checked("thin_restore", ["-i", xml_path, "-o", out])
    finally:
        os.unlink(xml_path)
    return out

"""Bad metadata and bad dumps: every one gets a typed error (library) or a documented exit code with
one line on stderr (CLI), never a traceback, and the input is never changed.

Metadata files: empty, 1 byte, 4095 bytes, 4096 zero bytes, random bytes of several sizes, a valid
superblock followed by garbage, a valid superblock with everything after it zeroed, and copies of a
real pool's metadata truncated at many points. Each goes through ``Pool.open_files`` (read-only and
for writing), ``thinpool.tools.check.check``, ``thinpool check|dump|ls PATH``, and, put in place of
a pool's metadata, ``Pool.open`` and ``thinpool stat|dump|write POOL``.

Dumps for ``restore``: a real dump cut at many points (XML and JSON), unknown elements, garbage in
attributes, and JSON garbage: ``parse_dump`` raises InvalidArgument, ``thinpool restore`` exits 2
with one line, the dump is unchanged, and the output file is neither created nor changed.

A truncated copy that still holds every block the trees reach may dump and list as the original
did (thin_dump does too); it must then give exactly the original's output, and ``check`` must still
report the truncation.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

from tests.cli.helpers import tp
from thinpool import Pool
from thinpool.cli import main
from thinpool.errors import InvalidArgument, MetadataError, ThinpoolError
from thinpool.tools.check import check
from thinpool.tools.restore import parse_dump

MiB = 1 << 20
BS = 64 * 1024


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def cli(home: Path, *argv: str, stdin: bytes = b"") -> tuple[int, bytes, str]:
    """``thinpool --home HOME ARGV`` in-process, stdio as a non-terminal process has it."""
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    fakes = (io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
             io.TextIOWrapper(out, encoding="utf-8", write_through=True),
             io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True))
    sys.stdin, sys.stdout, sys.stderr = fakes      # (kept referenced: a collected one closes out)
    try:
        code = main(["--home", str(home), *argv])
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue().decode("utf-8", errors="replace")


def assert_clean_failure(code: int, err: str, codes, what) -> None:
    assert code in codes, (what, code, err)
    assert "Traceback" not in err and "unexpected error" not in err, (what, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("thinpool: "), (what, err)


# -- a real pool ---------------------------------------------------------------------------------
class Real:
    """A pool with several devices, snapshots and a few hundred mappings (multi-level trees)."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.pool = self.home / "demo"
        rng = random.Random(5)
        with Pool.create(self.pool, data_size=64 * MiB) as pool:
            vol = pool.create_thin("vol0", 512 * BS)
            for vb in rng.sample(range(512), 400):
                vol.write(vb * BS + rng.randrange(BS), b"x")
            pool.snapshot("vol0", "snap0")
            pool.create_thin("vol1", 64 * BS).write(0, bytes(range(256)) * 64)
            for vb in rng.sample(range(512), 100):
                vol.write(vb * BS, b"y")
            pool.delete("vol1")
            pool.create_thin("vol2", 8 * BS)
        self.metadata = self.pool / "metadata"
        self.bytes = self.metadata.read_bytes()
        code, self.xml, err = cli(self.home, "dump", str(self.metadata))
        assert code == 0, err
        code, self.json, err = cli(self.home, "dump", str(self.metadata), "--format", "json")
        assert code == 0, err
        code, self.ls, err = cli(self.home, "ls", str(self.metadata))
        assert code == 0, err
        # The last block any tree or space map reaches: truncating past it loses nothing read.
        with Pool.open_files(self.metadata) as p:
            self.used_blocks = p.metadata.metadata_sm.nr_allocated()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    os.environ.pop("THINPOOL_DEBUG", None)
    return Real(tmp_path_factory.mktemp("bad-metadata"))


def _bad_metadata_cases() -> list[str]:
    cases = ["empty", "one-byte", "4095-bytes", "4096-zeros", "8192-zeros", "random-100",
             "random-4096", "random-12288", "random-1M", "superblock+garbage",
             "superblock+zeros", "superblock-only", "flipped-superblock"]
    cases += [f"cut-{n}" for n in (1, 2048, 4096, 4097, 8192, 12288, 20000, 40960)]
    cases += [f"cut-random-{i}" for i in range(8)]
    return cases


def bad_metadata(real: Real, case: str) -> bytes:
    rng = random.Random(case)
    b = real.bytes
    if case == "empty":
        return b""
    if case == "one-byte":
        return b"\x01"
    if case == "4095-bytes":
        return b[:4095]
    if case.endswith("-zeros") and case[0].isdigit():
        return bytes(int(case.split("-")[0]))
    if case.startswith("random-"):
        n = {"1M": MiB}.get(case.split("-")[1]) or int(case.split("-")[1])
        return rng.randbytes(n)
    if case == "superblock+garbage":
        return b[:4096] + rng.randbytes(len(b) - 4096)
    if case == "superblock+zeros":
        return b[:4096] + bytes(len(b) - 4096)
    if case == "superblock-only":
        return b[:4096]
    if case == "flipped-superblock":
        i = rng.randrange(4, 4096)
        return b[:i] + bytes([b[i] ^ 0x10]) + b[i + 1:]
    if case.startswith("cut-random-"):
        return b[: rng.randrange(1, len(b))]
    if case.startswith("cut-"):
        return b[: int(case.split("-")[1])]
    raise AssertionError(case)


@pytest.mark.parametrize("case", _bad_metadata_cases())
def test_bad_metadata_file(real, tmp_path, case):
    data = bad_metadata(real, case)
    path = tmp_path / "meta"
    path.write_bytes(data)
    digest = sha(path)
    complete = case.startswith("cut-") and len(data) >= real.used_blocks * 4096

    # The library: typed errors on open, findings from check.
    for read_only in (True, False):
        with pytest.raises(ThinpoolError) as e:
            Pool.open_files(path, read_only=read_only).close()
        assert isinstance(e.value, (MetadataError, InvalidArgument)), (case, read_only, e.value)
    report = check(path)
    assert not report.clean, case
    assert sha(path) == digest, case

    # The command line.
    code, out, err = cli(tmp_path, "check", str(path))
    assert code == 3 and "Traceback" not in err and len(err.splitlines()) <= 1, (case, code, err)
    assert b"problem(s) found" in out, (case, out)
    for argv, expected in ((["dump", str(path)], real.xml), (["ls", str(path)], real.ls),
                           (["dump", str(path), "--format", "json"], real.json)):
        code, out, err = cli(tmp_path, *argv)
        if code == 0 and complete:
            assert out == expected, (case, argv)     # nothing it reads was cut off
            continue
        assert_clean_failure(code, err, {1, 2, 3}, (case, argv))
    assert sha(path) == digest, case


@pytest.mark.parametrize("case", ["empty", "4096-zeros", "random-4096", "superblock+garbage",
                                  "superblock+zeros", "cut-8192", "cut-random-0", "flipped-superblock"])
def test_bad_metadata_in_a_pool(real, tmp_path, case):
    """A pool whose metadata is bad: opening fails with MetadataError, every command exits 3
    with one line (or check's report), and no file of the pool changes; the one file added is
    the needs-check marker (damage.py), which keeps later writes off the pool until a check."""
    home = tmp_path / "home"
    shutil.copytree(real.pool, home / "demo")
    (home / "demo" / "metadata").write_bytes(bad_metadata(real, case))
    before = tree_hashes(home)
    for read_only in (True, False):
        with pytest.raises(MetadataError):
            Pool.open(home / "demo", read_only=read_only).close()
    for argv, stdin in ((["stat", "demo"], b""), (["stat", "demo", "--json"], b""),
                        (["dump", "demo"], b""), (["ls", "demo"], b""),
                        (["read", "demo/vol0", "--length", "10"], b""),
                        (["write", "demo/vol0"], b"data"), (["create", "demo/new", "--size", "1M"], b""),
                        (["snapshot", "demo/vol0", "s1"], b""), (["delete", "demo/vol0"], b""),
                        (["resize", "demo", "--size", "128M"], b"")):
        code, _, err = cli(home, *argv, stdin=stdin)
        assert_clean_failure(code, err, {3}, (case, argv))
    code, out, err = cli(home, "check", "demo")
    lines = [ln for ln in err.splitlines() if "is marked for a check" not in ln]
    assert code == 3 and "Traceback" not in err and len(lines) <= 1, (case, code, err)
    after = tree_hashes(home)
    assert after.pop("demo/needs-check.json", None) is not None, case
    assert after == before, case


def test_console_script_on_bad_metadata(real, tmp_path):
    """The same through the installed console script, for a few files."""
    for case in ("empty", "random-4096", "superblock+garbage"):
        path = tmp_path / case
        path.write_bytes(bad_metadata(real, case))
        digest = sha(path)
        r = tp(tmp_path, "check", str(path))
        assert r.returncode == 3 and "Traceback" not in r.stderr, (case, r.stderr)
        for cmd in ("dump", "ls"):
            r = tp(tmp_path, cmd, str(path))
            assert_clean_failure(r.returncode, r.stderr, {3}, (case, cmd))
        assert sha(path) == digest


# -- restore from bad dumps ----------------------------------------------------------------------
ATTR_GARBAGE = ["", "abc", "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x10", "1_0", "١", "½",
                "99999999999999999999999", "18446744073709551616", "9" * 5000, "&#x31;x", "NaN"]


def _bad_dumps(real: Real) -> dict[str, bytes]:
    xml, js = real.xml, real.json
    rng = random.Random(11)
    out: dict[str, bytes] = {}
    close = xml.rindex(b"</superblock>") + len(b"</superblock>")
    cuts = sorted({0, 1, 10, close - 1, xml.index(b">") + 1, xml.index(b"</device>"),
                   xml.index(b"</device>") + len(b"</device>\n")} | {rng.randrange(close) for _ in range(14)})
    for c in cuts:
        out[f"xml-cut-{c}"] = xml[:c]
    jend = js.rindex(b"}") + 1
    for c in sorted({0, 1, 2, jend - 1} | {rng.randrange(jend) for _ in range(8)}):
        out[f"json-cut-{c}"] = js[:c]
    out["xml-unknown-element"] = xml.replace(b"<device ", b"<gadget ", 1)
    out["xml-unknown-child"] = xml.replace(b"</device>", b"<extra/></device>", 1)
    out["xml-unknown-root"] = b"<pool/>\n"
    out["xml-two-superblocks"] = xml.rstrip() + xml
    out["xml-mapping-outside-device"] = xml.replace(
        b"</superblock>", b'<single_mapping origin_block="0" data_block="0" time="0"/></superblock>')
    out["xml-nested-device"] = xml.replace(b"</device>", b"", 1)
    out["xml-duplicate-attribute"] = xml.replace(b"<superblock ", b'<superblock flags="0" ', 1)
    out["xml-not-xml"] = b"this is not a dump\n"
    out["xml-binary"] = rng.randbytes(3000)
    out["xml-nul"] = xml[:50] + b"\0" + xml[50:]
    out["xml-doctype-bomb"] = (b'<!DOCTYPE s [<!ENTITY a "aaaaaaaaaa">' + b"".join(
        f'<!ENTITY a{i} "{"&a;" * 10 if i == 0 else f"&a{i - 1};" * 10}">'.encode() for i in range(8))
        + b']><superblock uuid="&a7;" time="0" transaction="0" data_block_size="128" '
          b'nr_data_blocks="1"></superblock>')
    out["xml-huge-range"] = (
        b'<superblock uuid="" time="0" transaction="1" flags="0" version="2" data_block_size="128" '
        b'nr_data_blocks="100000000000000"><device dev_id="1" mapped_blocks="0" transaction="0" '
        b'creation_time="0" snap_time="0"><range_mapping origin_begin="0" data_begin="0" '
        b'length="10000000000000" time="0"/></device></superblock>')
    out["xml-range-length-2^64-1"] = out["xml-huge-range"].replace(
        b'length="10000000000000"', b'length="18446744073709551615"').replace(
        b'nr_data_blocks="100000000000000"', b'nr_data_blocks="100"')
    for attr in (b"data_block_size", b"nr_data_blocks", b"dev_id", b"origin_block", b"data_block",
                 b"time", b"transaction", b"origin_begin", b"length", b"version"):
        for i, g in enumerate(rng.sample(ATTR_GARBAGE, 4)):
            tag = attr + b'="'
            if tag not in xml:
                continue
            start = xml.index(tag) + len(tag)
            end = xml.index(b'"', start)
            out[f"xml-attr-{attr.decode()}-{i}"] = xml[:start] + g.encode() + xml[end:]
        if attr + b'="' in xml and attr != b"version":       # version is optional (1)
            start = xml.index(attr + b'="')
            end = xml.index(b'"', start + len(attr) + 2) + 1
            out[f"xml-attr-{attr.decode()}-missing"] = xml[:start] + xml[end:]
    doc = json.loads(js)

    def variant(name, f):
        d = json.loads(js)
        f(d)
        out[f"json-{name}"] = json.dumps(d).encode()

    variant("no-superblock", lambda d: d.pop("superblock"))
    variant("no-devices", lambda d: d.pop("devices"))
    variant("superblock-list", lambda d: d.__setitem__("superblock", []))
    variant("devices-dict", lambda d: d.__setitem__("devices", {}))
    variant("string-number", lambda d: d["superblock"].__setitem__("nr_data_blocks", "64"))
    variant("float-number", lambda d: d["superblock"].__setitem__("time", 1.5))
    variant("bool-number", lambda d: d["superblock"].__setitem__("transaction", True))
    variant("negative", lambda d: d["devices"][0].__setitem__("dev_id", -1))
    variant("huge", lambda d: d["devices"][0].__setitem__("transaction", 2**70))
    variant("mapping-short", lambda d: d["devices"][0]["mappings"].append([1, 2]))
    variant("mapping-long", lambda d: d["devices"][0]["mappings"].append([1, 2, 3, 4, 5]))
    variant("mapping-null", lambda d: d["devices"][0]["mappings"].append(None))
    variant("mapping-past-end", lambda d: d["devices"][0]["mappings"].append(
        [0, doc["superblock"]["nr_data_blocks"], 1, 0]))
    variant("mapping-huge-length", lambda d: d["devices"][0]["mappings"].append([0, 0, 2**63, 0]))
    variant("bad-block-size", lambda d: d["superblock"].__setitem__("data_block_size", 100))
    variant("device-twice", lambda d: d["devices"].append(d["devices"][0]))
    out["json-infinity"] = js.replace(b'"nr_data_blocks": ', b'"nr_data_blocks": Infinity, "x": ', 1)
    out["json-nan"] = js.replace(b'"time": ', b'"time": NaN, "y": ', 1)
    out["json-deep"] = b'{"superblock": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    out["json-unrelated-object"] = b'{"a": 1}'
    out["json-trailing-garbage"] = js + b"garbage"
    out["json-utf16"] = js.decode().encode("utf-16")
    same = [name for name, d in out.items() if d in (xml, js)]
    assert not same, f"these edits changed nothing: {same}"
    return out


@pytest.fixture(scope="module")
def bad_dumps(real):
    return _bad_dumps(real)


def test_bad_dumps_cover_enough(bad_dumps):
    assert len(bad_dumps) >= 80


def test_restore_bad_dumps(real, bad_dumps, tmp_path):
    existing = tmp_path / "existing.img"
    existing.write_bytes(real.bytes)
    existing_digest = sha(existing)
    failures = []
    for name, data in bad_dumps.items():
        src = tmp_path / f"{name}.dump"
        src.write_bytes(data)
        digest = sha(src)
        try:
            parse_dump(src)
        except InvalidArgument:
            pass
        except Exception as e:  # noqa: BLE001 - the point: nothing else
            failures.append(f"{name}: parse_dump raised {type(e).__name__}: {e}")
        else:
            failures.append(f"{name}: parse_dump accepted it")
        for out in (existing, tmp_path / "new.img"):
            code, _, err = cli(tmp_path, "restore", "-i", str(src), "-o", str(out))
            try:
                assert_clean_failure(code, err, {2}, (name, out.name))
            except AssertionError as e:
                failures.append(str(e)[:400])
        assert sha(src) == digest, name
        assert sha(existing) == existing_digest, name
        assert not (tmp_path / "new.img").exists(), name
    assert not failures, "\n".join(failures)


def test_restore_good_dump_still_works(real, tmp_path):
    """The strictness above does not refuse what dump writes."""
    for fmt, text in (("xml", real.xml), ("json", real.json)):
        src = tmp_path / f"dump.{fmt}"
        src.write_bytes(text)
        out = tmp_path / f"out-{fmt}.img"
        code, _, err = cli(tmp_path, "restore", "-i", str(src), "-o", str(out))
        assert code == 0, err
        code, again, err = cli(tmp_path, "dump", str(out))
        assert code == 0 and again == real.xml, err


def test_console_script_restore(real, tmp_path):
    dumps = _bad_dumps(real)
    for name in ("xml-cut-10", "json-deep", "xml-huge-range", "xml-attr-length-0"):
        if name not in dumps:
            continue
        src = tmp_path / name
        src.write_bytes(dumps[name])
        r = tp(tmp_path, "restore", "-i", str(src), "-o", str(tmp_path / "out.img"))
        assert_clean_failure(r.returncode, r.stderr, {2}, name)
        assert not (tmp_path / "out.img").exists()

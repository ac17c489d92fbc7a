"""Our dump, ls, delta, check and restore against thin-provisioning-tools 0.9.0 on random metadata.

Two sources of metadata, so both our writer's and thin_restore's layouts are read:

* pools built at random through the :class:`~thinpool.Pool` API (many volumes, snapshots of
  snapshots, deletes, discards, thousands of scattered one-byte writes in some of them);
* images that the real ``thin_restore`` writes from random XML (``random_superblock``: 24-bit
  device ids, 64-bit transaction ids, shared data blocks, huge data block sizes, and one case
  with hundreds of devices so the details and top-level trees have internal nodes).

For every image: the XmlEmitter's text equals ``thin_dump`` byte for byte; our ls equals
``thin_ls -o`` for every field 0.9.0 knows (with and without headers, and the default fields);
our delta (plain and ``--verbose``) equals ``thin_delta`` for pairs that include a device with
itself and empty devices; ``check`` and ``thin_check`` both pass; and every dump/restore round
trip (thin_restore of our XML, our restore of thin_dump's XML, our JSON) dumps back identically.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from tests.tools.helpers import (LS_FIELDS_090, delta_pairs, our_delta, our_dump, our_ls,
                                 random_pool, sparse_file, tools_delta, tools_dump, tools_ls)
from tests.tptools import assert_checks_pass
from tests.tptools import random_superblock, requires_tools, thin_check, thin_restore, to_xml
from thinpool.errors import NotFound
from thinpool.metadata.walker import MetadataReader
from thinpool.snapshot.accounting import DEFAULT_LS_FIELDS
from thinpool.tools.check import check
from thinpool.tools.dump import XmlEmitter, dump
from thinpool.tools.restore import parse_dump, restore

pytestmark = requires_tools

#: Pool API seeds; every third one writes thousands of blocks in a step.
POOL_SEEDS = range(6)
#: random_superblock seeds; the "many" case has hundreds of devices.
XML_SEEDS = range(12)

CASES = ([f"pool-{s}" for s in POOL_SEEDS] + [f"xml-{s}" for s in XML_SEEDS] + ["xml-many"])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Models of the Pool API cases (filled as the images are built), for the coverage test."""
    return {}


@pytest.fixture(scope="module", params=CASES)
def image(request, tmp_path_factory, built) -> Path:
    kind, _, seed = request.param.partition("-")
    d = tmp_path_factory.mktemp(request.param)
    if kind == "pool":
        s = int(seed)
        pool, model = random_pool(d / "pool", s, steps=30, max_writes=3000 if s % 3 == 0 else 300)
        pool.close()
        built[s] = model
        return d / "pool" / "metadata"
    if seed == "many":
        rng = random.Random(4242)
        sb = random_superblock(rng, max_devices=400, max_mappings=4000)
        while len(sb.devices) < 260:
            sb = random_superblock(rng, max_devices=400, max_mappings=4000)
    else:
        sb = random_superblock(random.Random(int(seed)), max_mappings=3000)
    return thin_restore(to_xml(sb), d / "meta.img")


def devices(path) -> list[int]:
    with MetadataReader(path) as r:
        return sorted(r.roots())


def test_dump_equals_thin_dump(image):
    assert our_dump(image) == tools_dump(image)


@pytest.mark.parametrize("headers", [True, False])
def test_ls_every_field_equals_thin_ls(image, headers):
    assert our_ls(image, LS_FIELDS_090, headers) == tools_ls(image, LS_FIELDS_090, headers)


def test_ls_default_and_reordered_fields(image):
    from tests.tptools import thin_ls
    assert our_ls(image, DEFAULT_LS_FIELDS) == thin_ls(image)
    fields = list(LS_FIELDS_090)
    random.Random(image.parent.name).shuffle(fields)
    fields = fields[:7]
    assert our_ls(image, fields) == tools_ls(image, fields)
    assert our_ls(image, fields, headers=False) == tools_ls(image, fields, headers=False)


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_delta_equals_thin_delta(image, verbose):
    devs = devices(image)
    if not devs:
        pytest.skip("no devices to compare")
    rng = random.Random(image.parent.name)
    pairs = delta_pairs(devs, rng, n=5)
    with MetadataReader(image) as r:
        empty = [d for d, root in r.roots().items() if not len(r.device_arrays(root)[0])]
    if empty:
        pairs += [(empty[0], devs[-1]), (devs[-1], empty[0]), (empty[0], empty[-1])]
    for left, right in pairs:
        assert our_delta(image, left, right, verbose) == tools_delta(image, left, right, verbose), \
            f"thin_delta --thin1 {left} --thin2 {right}"


def test_check_is_clean_like_thin_check(image):
    r = thin_check(image)
    assert r.returncode == 0, r.stderr
    report = check(image)
    assert report.clean, [str(f) for f in report.errors]
    assert report.transaction_id == int(r.stdout.split("TRANSACTION_ID=")[1].split()[0])
    with MetadataReader(image) as rd:
        roots = rd.roots()
        assert report.nr_devices == len(roots)
        assert report.nr_mappings == sum(len(rd.device_arrays(x)[0]) for x in roots.values())


def test_thin_restore_of_our_dump_dumps_back(image, tmp_path):
    ours = our_dump(image)
    out = thin_restore(ours, tmp_path / "restored.img", image.stat().st_size)
    assert tools_dump(out) == ours
    assert_checks_pass(out)


def test_our_restore_of_thin_dump_dumps_back(image, tmp_path):
    theirs = tools_dump(image)
    (tmp_path / "dump.xml").write_text(theirs)
    out = sparse_file(tmp_path / "restored.img", image.stat().st_size)
    restore(parse_dump(tmp_path / "dump.xml"), out)
    assert tools_dump(out) == theirs
    assert our_dump(out) == theirs
    assert_checks_pass(out)
    assert check(out).clean


def test_json_dump_restore_dumps_back(image, tmp_path):
    (tmp_path / "dump.json").write_text(our_dump(image, as_json=True))
    out = sparse_file(tmp_path / "restored.img", image.stat().st_size)
    restore(parse_dump(tmp_path / "dump.json"), out)
    assert tools_dump(out) == tools_dump(image)
    assert our_dump(out, as_json=True) == our_dump(image, as_json=True)


def test_random_pools_cover_the_shapes(built, tmp_path_factory):
    """The generator really made what the other tests claim to cover."""
    if len(built) < len(POOL_SEEDS):       # run alone: build the pools
        for s in POOL_SEEDS:
            if s not in built:
                d = tmp_path_factory.mktemp(f"cover-{s}")
                pool, built[s] = random_pool(d / "pool", s, steps=30,
                                             max_writes=3000 if s % 3 == 0 else 300)
                pool.close()
    events = set().union(*(m.events for m in built.values()))
    assert events >= {"snapshot of a snapshot", "delete", "discard", "partial discard",
                      "thousands of writes"}
    sizes = [len(c) for m in built.values() for c in m.volumes.values()]
    assert max(sizes) >= 2000 and 0 in sizes        # internal mapping nodes; a volume never written
    assert max(len(m.volumes) for m in built.values()) >= 8


def test_dump_of_chosen_devices_equals_thin_dump_dev_id(image):
    from tests.tptools import thin_dump
    devs = devices(image)
    for dev in devs[:1] + devs[-1:]:
        buf = io.StringIO()
        with MetadataReader(image) as r:
            dump(r, XmlEmitter(buf), dev_ids=[dev])
        assert buf.getvalue() == thin_dump(image, "--dev-id", str(dev))


def test_dump_of_an_unknown_device_is_not_found_and_writes_nothing(image):
    """Regression: an unknown device id raised MetadataError (exit status 3, "damaged") after
    the superblock line had already been written."""
    devs = devices(image)
    unknown = next(d for d in range(1 << 24) if d not in devs)
    buf = io.StringIO()
    with MetadataReader(image) as r, pytest.raises(NotFound):
        dump(r, XmlEmitter(buf), dev_ids=[*devs[:1], unknown])
    assert buf.getvalue() == ""


def test_delta_of_an_unknown_device_is_not_found(image):
    devs = devices(image)
    unknown = next(d for d in range(1 << 24) if d not in devs)
    with pytest.raises(AssertionError):                  # thin_delta exits non-zero
        tools_delta(image, unknown, devs[0] if devs else unknown)
    with pytest.raises(NotFound):
        our_delta(image, unknown, devs[0] if devs else unknown)

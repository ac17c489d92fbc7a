"""Reports as ``lvs`` prints them, for ``list`` and ``stat``: chosen fields, units, sorting.

A report is a list of rows and a list of fields. A row is a dict whose keys are the keys of
``stat --json`` / ``list --json`` (a volume's own keys, its pool's keys, and a few derived
ones: ``attr``, ``type``, percentages); a field says how one key is printed. The options
(:func:`report_options`, the same on both commands):

* ``-o FIELD,...`` the fields to show, in that order; ``-o +FIELD,...`` the default ones and
  these; ``-o help`` lists every field with what it means (and changes nothing).
* ``--units h|b|s|k|m|g|t|p`` how sizes are printed: ``h`` (the default) in IEC units as the
  tables always did, ``b`` exact bytes, ``s`` 512-byte sectors, ``k``...``p`` powers of 1024
  with two decimals and a one-letter suffix (``1.50g``); capital ``K``...``P`` use powers of
  1000, as lvs does. ``--nosuffix`` drops the suffix.
* ``--noheadings``, ``--separator S`` (no alignment then: one row per line, fields joined by S).
* ``--sort [-]FIELD,...`` orders rows by those fields (``-`` descending), on the exact values.

A value a row lacks (a pool row of ``list`` has no device id, a volume no origin) prints as
``-`` in aligned columns, so that every row splits into as many words, and as nothing with
``--separator``. Unknown
field names are a usage error (exit 2) that names ``-o help``. Nothing here reads a pool: the
command builds the rows, this module only selects, orders and renders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import click

from thinpool.errors import InvalidArgument
from thinpool.units import format_size

from . import output

SIZE, COUNT, PERCENT, TEXT, FLAG, NAMES = "size", "count", "percent", "text", "flag", "names"
META_BLOCK = 4096


@dataclass(frozen=True)
class Field:
    key: str
    kind: str
    help: str
    heading: str = ""

    @property
    def title(self) -> str:
        return self.heading or self.key.replace("_", " ")


def _pct(part, whole):
    return None if part is None or not whole else 100 * min(part, whole) / whole


# -- the fields ------------------------------------------------------------------------------
VOLUME_FIELDS = [
    Field("name", TEXT, "the volume's name (POOL/NAME in list)"),
    Field("type", TEXT, "volume, snapshot (it has an origin) or pool (list)"),
    Field("dev_id", COUNT, "its dm-thin device id", "dev id"),
    Field("size", SIZE, "virtual size (a pool's data size in list)", "virtual size"),
    Field("mapped_bytes", SIZE, "bytes in mapped blocks", "mapped"),
    Field("mapped_blocks", COUNT, "mapped data blocks"),
    Field("mapped_percent", PERCENT, "mapped bytes as a share of the virtual size", "mapped %"),
    Field("exclusive_bytes", SIZE, "bytes in blocks no other volume maps", "exclusive"),
    Field("exclusive_blocks", COUNT, "blocks no other volume maps"),
    Field("shared_bytes", SIZE, "bytes in blocks other volumes map too", "shared"),
    Field("shared_blocks", COUNT, "blocks other volumes map too"),
    Field("attr", TEXT, "r: read-only, w: writable (as lvs's lv_attr permission letter)"),
    Field("read_only", FLAG, "whether writes are refused"),
    Field("origin", TEXT, "the volume it was snapshotted from"),
    Field("served", TEXT, "nbd while thinpool serve exports it (and its loop device when "
                          "attached)"),
    Field("ancestors", NAMES, "its origin, the origin's origin, ... (nearest first)"),
    Field("descendants", NAMES, "every snapshot taken of it, and of those, ..."),
    Field("creation_time", COUNT, "the pool's time counter when it was created"),
    Field("snapshotted_time", COUNT, "the pool's time counter when it was last snapshotted"),
]
POOL_FIELDS = [
    Field("pool", TEXT, "the pool's name"),
    Field("path", TEXT, "the pool's directory"),
    Field("block_size", SIZE, "the pool's data block size", "block size"),
    Field("data_size", SIZE, "the pool's data space"),
    Field("data_used", SIZE, "data space in use"),
    Field("data_free", SIZE, "data space free"),
    Field("data_percent", PERCENT, "data space in use, in percent", "data %"),
    Field("data_blocks_total", COUNT, "data blocks"),
    Field("data_blocks_used", COUNT, "data blocks in use"),
    Field("data_blocks_free", COUNT, "data blocks free"),
    Field("metadata_size", SIZE, "the metadata device's size"),
    Field("metadata_used", SIZE, "metadata in use"),
    Field("metadata_percent", PERCENT, "metadata in use, in percent", "metadata %"),
    Field("metadata_blocks_total", COUNT, "4 KiB metadata blocks"),
    Field("metadata_blocks_used", COUNT, "metadata blocks in use"),
    Field("transaction_id", COUNT, "the pool's transaction id"),
    Field("mode", TEXT, "write, out_of_data_space, read_only or fail"),
    Field("needs_check", FLAG, "whether the metadata must be checked before writing"),
]
#: ``list`` only: one column for what a row of either kind uses.
LIST_FIELDS = [
    Field("used", SIZE, "mapped bytes of a volume, data space in use of a pool"),
    Field("use_percent", PERCENT, "used as a share of size", "use %"),
]

STAT_DEFAULT = ("name", "dev_id", "size", "mapped_bytes", "mapped_percent", "exclusive_bytes",
                "shared_bytes", "attr", "origin")
LIST_DEFAULT = ("name", "type", "size", "used", "use_percent", "origin")
#: Headings that read differently in ``list``, whose rows are pools and volumes.
LIST_HEADINGS = {"size": "size"}


def pool_keys(st: dict) -> dict:
    """The byte and percent keys of a pool, from its ``stat`` dict (added to it in place, so
    ``stat --json`` and ``list --json`` carry them too)."""
    bs = st["block_size"]
    st["data_size"] = st["data_blocks_total"] * bs
    st["data_used"] = st["data_blocks_used"] * bs
    st["data_free"] = st["data_blocks_free"] * bs
    st["metadata_size"] = st["metadata_blocks_total"] * META_BLOCK
    st["metadata_used"] = st["metadata_blocks_used"] * META_BLOCK
    by_name = {v["name"]: v for v in st["volumes"]}
    children: dict[str, list[str]] = {}
    for v in st["volumes"]:
        if v["origin"] in by_name:
            children.setdefault(v["origin"], []).append(v["name"])
    for v in st["volumes"]:
        v["exclusive_bytes"] = v["exclusive_blocks"] * bs
        v["shared_bytes"] = v["shared_blocks"] * bs
        chain, o = [], v["origin"]
        while o in by_name and o not in chain and o != v["name"]:
            chain.append(o)
            o = by_name[o]["origin"]
        v["ancestors"] = chain
        below, todo = [], list(children.get(v["name"], ()))
        while todo:
            c = todo.pop(0)
            if c not in below and c != v["name"]:
                below.append(c)
                todo.extend(children.get(c, ()))
        v["descendants"] = below
    return st


def _pool_row(st: dict) -> dict:
    row = {f.key: st[f.key] for f in POOL_FIELDS if f.key in st}
    row.update(pool=st["name"], data_percent=_pct(st["data_used"], st["data_size"]),
               metadata_percent=_pct(st["metadata_used"], st["metadata_size"]))
    return row


def volume_rows(st: dict, full_names: bool = False) -> list[dict]:
    """A row per volume of pool ``st`` (after :func:`pool_keys`)."""
    base = _pool_row(st)
    rows = []
    for v in st["volumes"]:
        row = {**base, **v}
        if full_names:
            row["name"] = f"{st['name']}/{v['name']}"
        row["type"] = "snapshot" if v["origin"] else "volume"
        row["attr"] = "r" if v.get("read_only") else "w"
        row["served"] = (None if not v.get("served") else
                         "nbd" + (f", {v['attached']}" if v.get("attached") else ""))
        row["mapped_percent"] = _pct(v["mapped_bytes"], v["size"])
        row["used"], row["use_percent"] = v["mapped_bytes"], row["mapped_percent"]
        rows.append(row)
    return rows


def pool_row(st: dict) -> dict:
    """``list``'s row of a pool itself (volume fields empty; size and used its data space)."""
    row = _pool_row(st)
    row.update(name=st["name"], type="pool", size=st["data_size"], used=st["data_used"],
               use_percent=row["data_percent"])
    return row


# -- options ---------------------------------------------------------------------------------
UNITS = "hbskmgtpKMGTP"


def report_options(f: Callable) -> Callable:
    """The report options of ``list`` and ``stat``."""
    for opt in reversed([
        click.option("-o", "--options", "fields", metavar="FIELD,...|+FIELD,...|help",
                     help="The fields to show ('+F' adds to the default; 'help' lists them)."),
        click.option("--units", type=click.Choice(list(UNITS)), metavar="[h|b|s|k|m|g|t|p]",
                     help="Print sizes in this unit (capitals: powers of 1000); default h."),
        click.option("--nosuffix", is_flag=True, help="No unit suffix on sizes."),
        click.option("--noheadings", is_flag=True, help="No heading line."),
        click.option("--separator", metavar="S", help="Join fields with S instead of aligning."),
        click.option("--sort", "sort_keys", metavar="[-]FIELD,...",
                     help="Order rows by these fields ('-': descending)."),
    ]):
        f = opt(f)
    return f


@dataclass
class Report:
    fields: str | None = None
    units: str | None = None
    nosuffix: bool = False
    noheadings: bool = False
    separator: str | None = None
    sort_keys: str | None = None

    def __post_init__(self) -> None:
        sep = self.separator
        if sep is not None:
            try:
                sep.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"--separator {sep!r} is not text the output can "
                                      f"carry (it is not UTF-8)") from None
            if "\n" in sep or "\r" in sep:
                raise InvalidArgument("--separator cannot hold a line break")

    @property
    def asked(self) -> bool:
        """Any report option given (the commands then print only the report)."""
        return any((self.fields, self.units, self.nosuffix, self.noheadings,
                    self.separator is not None, self.sort_keys))

    @property
    def wants_help(self) -> bool:
        return (self.fields or "").strip() == "help"


def field_table(kind: str) -> list[Field]:
    return VOLUME_FIELDS + (LIST_FIELDS if kind == "list" else []) + POOL_FIELDS


def show_help(kind: str) -> None:
    """``-o help``: every field of this command's report."""
    fields = field_table(kind)
    width = max(len(f.key) for f in fields)
    default = LIST_DEFAULT if kind == "list" else STAT_DEFAULT
    output.line(f"Fields of 'thinpool {kind}' reports (default: -o {','.join(default)}):")
    for f in fields:
        output.line(f"  {f.key:<{width}}  {f.kind:<7}  {f.help}")


def _choose(spec: str | None, kind: str) -> list[Field]:
    table = {f.key: f for f in field_table(kind)}
    default = list(LIST_DEFAULT if kind == "list" else STAT_DEFAULT)
    if not spec:
        return [table[k] for k in default]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise InvalidArgument("-o needs field names; 'thinpool %s -o help' lists them" % kind)
    if names[0].startswith("+"):
        names = default + [n.lstrip("+") for n in names]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise InvalidArgument(f"unknown field{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; 'thinpool {kind} -o help' "
                              f"lists the fields")
    return [table[n] for n in names]


def _sorted(rows: list[dict], spec: str | None, kind: str) -> list[dict]:
    if not spec:
        return rows
    table = {f.key for f in field_table(kind)}
    for key in reversed([k.strip() for k in spec.split(",") if k.strip()]):
        desc = key.startswith("-")
        key = key.lstrip("-+")
        if key not in table:
            raise InvalidArgument(f"cannot sort by unknown field {key!r}; 'thinpool {kind} "
                                  f"-o help' lists the fields")
        present = [r for r in rows if r.get(key) is not None]
        missing = [r for r in rows if r.get(key) is None]
        present.sort(key=lambda r: _sort_value(r[key]), reverse=desc)
        rows = present + missing           # stable: earlier keys break ties
    return rows


def _sort_value(v: Any):
    return ",".join(v) if isinstance(v, list) else v


def format_value(f: Field, value: Any, units: str | None, nosuffix: bool) -> str:
    if value is None:
        return ""
    if f.kind == SIZE:
        return format_bytes(value, units or "h", nosuffix)
    if f.kind == PERCENT:
        return f"{value:.2f}" if nosuffix else f"{value:.1f}%"
    if f.kind == FLAG:
        return "yes" if value else "no"
    if f.kind == NAMES:
        return ",".join(value)
    return str(value)


def format_bytes(n: int, unit: str, nosuffix: bool = False) -> str:
    """``n`` bytes in ``unit`` (one of :data:`UNITS`)."""
    if unit == "h":
        text = format_size(n)
        return text.split()[0] if nosuffix else text
    if unit == "b":
        return str(n)
    if unit == "s":
        whole, rest = divmod(n, 512)
        return str(whole) if not rest else f"{n / 512:.2f}"
    base = 1000 if unit.isupper() else 1024
    exp = "kmgtp".index(unit.lower()) + 1
    return f"{n / base ** exp:.2f}" + ("" if nosuffix else unit)


def render(rows: list[dict], opts: Report, kind: str, indent: int = 0) -> None:
    """Print ``rows`` as the options ask (after ``-o help`` was handled by the caller)."""
    fields = _choose(opts.fields, kind)
    rows = _sorted(rows, opts.sort_keys, kind)
    blank = "" if opts.separator is not None else "-"
    cells = [[format_value(f, r.get(f.key), opts.units, opts.nosuffix) or blank for f in fields]
             for r in rows]
    if opts.separator is not None:
        lines = [] if opts.noheadings else [opts.separator.join(f.key for f in fields)]
        lines += [opts.separator.join(c) for c in cells]
        for text in lines:
            output.line(text)
        return
    right = [f.kind in (SIZE, COUNT, PERCENT) for f in fields]
    if not opts.noheadings:
        titles = [LIST_HEADINGS.get(f.key, f.title) if kind == "list" else f.title
                  for f in fields]
        output.table(None, [(t, "right" if r else "left") for t, r in zip(titles, right)],
                     cells, indent=indent)
        return
    widths = [max((len(c[i]) for c in cells), default=0) for i in range(len(fields))]
    for c in cells:
        output.line("  ".join(v.rjust(w) if r else v.ljust(w)
                              for v, w, r in zip(c, widths, right)).rstrip())

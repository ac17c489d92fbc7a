"""Size parsing and printing: the one place thinpool turns "10G" into bytes and bytes into "10 GiB".

Contract
--------
``parse_size(text) -> int`` returns an exact, non-negative number of bytes.

* A bare number is bytes: ``"4096"`` -> 4096. An ``int`` argument is returned unchanged (if >= 0).
* Units (matched case-insensitively, optionally separated from the number by spaces or tabs):

  ====================================  ===============================================
  ``B`` (``b``)                          bytes
  ``s`` (``S``)                          512-byte sectors
  ``K M G T P`` (any case)               powers of 1024 (KiB, MiB, ...)
  ``KiB MiB GiB TiB PiB`` (any case)     powers of 1024
  ``kB MB GB TB PB`` (any case)          powers of 1000 -- the only decimal forms
  ====================================  ===============================================

  So ``"1k" == "1K" == "1KiB" == 1024`` while ``"1kB" == "1KB" == 1000``. ``b`` is always bytes,
  never bits.
* A decimal fraction is allowed only when the result is exact: ``"1.5K"`` -> 1536, but
  ``"1.1K"`` (1126.4 bytes) is rejected. Bytes and sectors are counting units: their count must be
  whole once the fraction is evaluated (``"1.0s"`` -> 512, ``"0.5s"`` and ``"1.5B"`` are rejected).
  No exponents, signs, digit separators, or leading/trailing dots (``".5K"``, ``"1."``).
* Surrounding ASCII whitespace is ignored.

Everything else raises :class:`thinpool.errors.InvalidArgument` whose message quotes the offending
text: empty or blank text, a negative size (``"-5G"``), an unknown unit (``"12Q"``), a malformed
number (``"1.5.5G"``, ``"G"``), ``inf``/``nan``, any non-ASCII character (so full-width digits
and the like never slip through ``int()``), and arguments that are neither ``str`` nor ``int``
(``bool`` and ``float`` included: a float cannot carry an exact byte count).

``format_size(n) -> str`` prints a byte count for people, in IEC units (``B KiB MiB GiB TiB PiB``)
with at most two decimals, trailing zeros trimmed, rounding half up: ``0 B``, ``512 B``,
``1 KiB``, ``1.5 KiB``, ``64 KiB``, ``10 GiB``, ``1.23 TiB``. The unit is the largest one not above
``n`` (a value that rounds up to 1024 of a unit is shown as 1 of the next, e.g. ``1 MiB`` for
1048575 bytes). When the printed value is exact, ``parse_size(format_size(n)) == n``; otherwise the
printed value is within 0.5 % of ``n`` (and ``parse_size`` may reject it as not a whole number of
bytes -- machine-readable output must use exact integers, see ``--json``). Negative or non-``int``
arguments raise ``InvalidArgument``.

Cost: both functions are O(length of the text) with exact integer/rational arithmetic; no floats
are involved anywhere, so results never depend on binary rounding. Neither allocates more than a few
small objects nor touches the OS.
"""

from __future__ import annotations

import re

from thinpool.errors import InvalidArgument

__all__ = ["SECTOR_SIZE", "parse_size", "format_size"]

SECTOR_SIZE = 512

_PREFIXES = "kmgtp"  # kilo .. peta; index + 1 is the power


def _unit_table() -> dict[str, tuple[int, int]]:
    """Lower-cased unit -> (bytes per unit, granule the result must be a multiple of)."""
    table: dict[str, tuple[int, int]] = {"": (1, 1), "b": (1, 1), "s": (SECTOR_SIZE, SECTOR_SIZE)}
    for power, prefix in enumerate(_PREFIXES, start=1):
        table[prefix] = (1024**power, 1)
        table[prefix + "ib"] = (1024**power, 1)
        table[prefix + "b"] = (1000**power, 1)
    return table


_UNITS = _unit_table()
_KNOWN_UNITS = "B, s, K M G T P, KiB MiB GiB TiB PiB, kB MB GB TB PB"

# ASCII only: the text is checked with str.isascii() first and the pattern uses explicit classes.
_SIZE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)[ \t]*(?P<unit>[A-Za-z]*)")
_NON_FINITE = {"inf", "infinity", "nan"}

_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _bad(text: object, why: str) -> InvalidArgument:
    return InvalidArgument(f"invalid size {text!r}: {why}")


def parse_size(text: str | int) -> int:
    """Return the number of bytes that ``text`` denotes; see the module docstring for the rules.

    Raises InvalidArgument (naming ``text``) for anything that is not an exact, non-negative size.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InvalidArgument(f"invalid size {text!r}: expected a string or an integer, "
                              f"not {type(text).__name__}")
    if isinstance(text, int):
        if text < 0:
            raise _bad(text, "a size cannot be negative")
        return text
    if not text.isascii():
        raise _bad(text, "contains non-ASCII characters")
    body = text.strip()
    if not body:
        raise _bad(text, "empty")
    if body.lstrip("+-").lower() in _NON_FINITE:
        raise _bad(text, "not a finite number")
    if body.startswith("-"):
        raise _bad(text, "a size cannot be negative")
    match = _SIZE_RE.fullmatch(body)
    if match is None:
        raise _bad(text, "expected a number with an optional unit, e.g. 512, 4K, 1.5GiB, 10GB, 2048s")
    unit = match["unit"]
    try:
        multiplier, granule = _UNITS[unit.lower()]
    except KeyError:
        raise _bad(text, f"unknown unit {unit!r} (known: {_KNOWN_UNITS})") from None
    from fractions import Fraction      # (imports decimal: ~5 ms that most commands never need)
    value = Fraction(match["num"]) * multiplier
    if value.denominator != 1 or value.numerator % granule:
        what = "sectors" if granule == SECTOR_SIZE else "bytes"
        raise _bad(text, f"not a whole number of {what}")
    return value.numerator


def format_size(n: int) -> str:
    """Return ``n`` bytes in IEC units with up to two decimals, e.g. ``"1.5 KiB"``.

    Raises InvalidArgument if ``n`` is not a non-negative ``int``.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidArgument(f"invalid size {n!r}: expected an integer number of bytes")
    if n < 0:
        raise InvalidArgument(f"invalid size {n!r}: a size cannot be negative")
    exp = min((n.bit_length() - 1) // 10, len(_IEC_UNITS) - 1) if n else 0
    hundredths = _hundredths(n, exp)
    if hundredths >= 1024 * 100 and exp < len(_IEC_UNITS) - 1:
        exp += 1  # 1023.999 KiB rounds to 1024 KiB: say 1 MiB instead
        hundredths = _hundredths(n, exp)
    whole, frac = divmod(hundredths, 100)
    if frac == 0:
        number = str(whole)
    elif frac % 10 == 0:
        number = f"{whole}.{frac // 10}"
    else:
        number = f"{whole}.{frac:02d}"
    return f"{number} {_IEC_UNITS[exp]}"


def _hundredths(n: int, exp: int) -> int:
    """``n / 1024**exp`` in hundredths, rounded half up, in exact integer arithmetic."""
    unit = 1024**exp
    return (n * 200 + unit) // (2 * unit)

"""parse_size / format_size: the table of accepted forms, the rejected ones, and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thinpool.errors import InvalidArgument
from thinpool.units import format_size, parse_size

KiB, MiB, GiB, TiB, PiB = (1024**i for i in range(1, 6))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", 0),
        ("1", 1),
        ("4096", 4096),
        ("512B", 512),
        ("512b", 512),
        ("512 B", 512),
        ("1K", KiB),
        ("1k", KiB),
        ("1KiB", KiB),
        ("1kib", KiB),
        ("1 KiB", KiB),
        ("64K", 64 * KiB),
        ("2m", 2 * MiB),
        ("2M", 2 * MiB),
        ("2MiB", 2 * MiB),
        ("10G", 10 * GiB),
        ("10g", 10 * GiB),
        ("10GiB", 10 * GiB),
        ("3T", 3 * TiB),
        ("3TiB", 3 * TiB),
        ("1P", PiB),
        ("1PiB", PiB),
        ("1kB", 1000),
        ("1KB", 1000),
        ("1MB", 1000**2),
        ("10GB", 10 * 1000**3),
        ("2TB", 2 * 1000**4),
        ("1PB", 1000**5),
        ("1s", 512),
        ("2048s", MiB),
        ("8S", 4096),
        ("1.0s", 512),
        ("1.5K", 1536),
        ("1.5 KiB", 1536),
        ("0.5M", 512 * KiB),
        ("1.25G", 1280 * MiB),
        ("1.5kB", 1500),
        ("0.001kB", 1),
        ("1.0", 1),
        ("  3G\t", 3 * GiB),
        ("0K", 0),
        ("007", 7),
        (12345, 12345),
        (0, 0),
    ],
)
def test_good_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\t\n",
        "-5G",
        "-1",
        "+5G",
        "12Q",
        "1KK",
        "1Ki",
        "1EiB",
        "1.5.5G",
        "G",
        "KiB",
        ".5K",
        "1.",
        "1e3",
        "1_000",
        "0x10",
        "1 2K",
        "inf",
        "-inf",
        "Infinity",
        "nan",
        "NaN",
        "0.5s",
        "1.5B",
        "1.5",
        "1.1K",
        "0.0001kB",
        "１G",  # full-width digit
        "10 GiB\u00a0",  # non-breaking space
        "5µB",
        "٣K",  # Arabic-Indic digit: int() would take it
    ],
)
def test_bad_sizes_raise_naming_the_text(text):
    with pytest.raises(InvalidArgument) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("value", [-1, True, 1.5, 2.0, None, b"1K"])
def test_bad_size_arguments(value):
    with pytest.raises(InvalidArgument):
        parse_size(value)


def test_messages_say_what_is_wrong():
    def message(text):
        with pytest.raises(InvalidArgument) as info:
            parse_size(text)
        return str(info.value)

    assert "negative" in message("-5G")
    assert "unknown unit 'Q'" in message("12Q")
    assert "empty" in message(" ")
    assert "finite" in message("nan")
    assert "non-ASCII" in message("１G")
    assert "sectors" in message("0.5s")
    assert "bytes" in message("1.1K")


def test_invalid_argument_is_a_value_error():
    with pytest.raises(ValueError):
        parse_size("12Q")


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1, "1 B"),
        (512, "512 B"),
        (1000, "1000 B"),
        (1023, "1023 B"),
        (KiB, "1 KiB"),
        (1536, "1.5 KiB"),
        (64 * KiB, "64 KiB"),
        (MiB - 1, "1 MiB"),
        (10 * GiB, "10 GiB"),
        (int(1.23 * TiB), "1.23 TiB"),
        (TiB + TiB // 10, "1.1 TiB"),
        (PiB, "1 PiB"),
        (2048 * PiB, "2048 PiB"),
    ],
)
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("value", [-1, True, 1.0, "1K", None])
def test_format_size_rejects(value):
    with pytest.raises(InvalidArgument):
        format_size(value)


UNITS = [("", 1), ("B", 1), ("b", 1), ("s", 512), ("K", KiB), ("k", KiB), ("KiB", KiB),
         ("M", MiB), ("MiB", MiB), ("G", GiB), ("g", GiB), ("GiB", GiB), ("T", TiB),
         ("TiB", TiB), ("P", PiB), ("PiB", PiB), ("kB", 1000), ("MB", 1000**2),
         ("GB", 1000**3), ("TB", 1000**4), ("PB", 1000**5)]


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(UNITS), st.sampled_from(["", " "]))
def test_integer_with_unit(count, unit, sep):
    suffix, multiplier = unit
    assert parse_size(f"{count}{sep}{suffix}") == count * multiplier


@given(st.integers(min_value=0, max_value=1023))
def test_bytes_round_trip(n):
    assert format_size(n) == f"{n} B"
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=4, max_value=4 * 1024 - 1), st.integers(min_value=1, max_value=5))
def test_exact_forms_round_trip(quarters, exp):
    # Quarter units from 1 up to 1023.75 print exactly (at most two decimals) and parse back.
    n = quarters * 1024**exp // 4
    text = format_size(n)
    assert text.endswith(("KiB", "MiB", "GiB", "TiB", "PiB")[exp - 1])
    assert parse_size(text) == n


@given(st.integers(min_value=0, max_value=2**70))
def test_format_is_close_and_parses_or_is_rejected(n):
    text = format_size(n)
    number, unit = text.split(" ")
    assert unit in {"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
    assert len(number.partition(".")[2]) <= 2
    assert not number.endswith("0") or "." not in number
    try:
        back = parse_size(text)
    except InvalidArgument:
        return  # not a whole number of bytes: allowed for inexact displays
    assert abs(back - n) * 200 <= n


@given(st.integers(min_value=0, max_value=2**64))
def test_bare_numbers_are_bytes(n):
    assert parse_size(str(n)) == n
    assert parse_size(n) == n


@given(st.text(max_size=12))
def test_never_raises_anything_but_invalid_argument(text):
    try:
        n = parse_size(text)
    except InvalidArgument:
        return
    assert isinstance(n, int) and n >= 0

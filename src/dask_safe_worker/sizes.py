"""Byte sizes as users type them, parsed exactly the way dask parses them.

`dask worker --memory-limit 2GiB` goes through `dask.utils.parse_bytes`; our own size
options accept the same spellings so that one value can be moved between the two.
"""

from __future__ import annotations

import math

from .records import record

_BASE_SIZES: dict[str, int] = {
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "PiB": 2**50,
    "B": 1,
    "": 1,
}


def _byte_sizes() -> dict[str, int]:
    sizes = {k.lower(): v for k, v in _BASE_SIZES.items()}
    sizes.update({k[0]: v for k, v in list(sizes.items()) if k and "i" not in k})
    sizes.update({k[:-1]: v for k, v in list(sizes.items()) if k and "i" in k})
    return sizes


BYTE_SIZES: dict[str, int] = _byte_sizes()


def parse_bytes(text: str) -> int:
    """dask.utils.parse_bytes for strings: '100', '5.4 kB', '1e6', '2GiB', 'MB'.

    Raises ValueError on anything dask would reject.
    """
    s = text.replace(" ", "")
    if not any(ch.isdigit() for ch in s):
        s = f"1{s}"
    i = len(s) - 1
    while i >= 0 and s[i].isalpha():
        i -= 1
    prefix, suffix = s[: i + 1], s[i + 1 :]
    try:
        number = float(prefix)
    except ValueError as exc:
        raise ValueError(f"Could not interpret {prefix!r} as a number") from exc
    try:
        multiplier = BYTE_SIZES[suffix.lower()]
    except KeyError as exc:
        raise ValueError(f"Could not interpret {suffix!r} as a byte unit") from exc
    result = number * multiplier
    if not math.isfinite(result):
        raise ValueError(f"{text!r} is not a finite size")
    return int(result)


def format_bytes(n: int) -> str:
    """Human-readable binary size for messages (exact bytes go into the audit log)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@record
class Amount:
    """A size given either in bytes or as a fraction of something else."""

    bytes: int | None = None
    fraction: float | None = None

    def of(self, whole: int) -> int:
        if self.fraction is not None:
            return int(whole * self.fraction)
        return self.bytes or 0

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction:g} of the memory before the reserve"
        return f"{self.bytes} bytes"


def parse_amount(text: str) -> Amount:
    """'512MiB' → bytes; '0.1' or '10%' → a fraction in [0, 1).

    A bare number below 1 is a fraction, as in dask's `--memory-limit 0.5`; a bare
    number of 1 or more is bytes.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty size")
    if s.endswith("%"):
        try:
            fraction = float(s[:-1]) / 100
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a percentage") from exc
        return _fraction(fraction, text)
    try:
        number = float(s)
    except ValueError:
        value = parse_bytes(s)
        if value < 0:
            raise ValueError(f"{text!r} is negative") from None
        return Amount(bytes=value)
    if number < 1:
        return _fraction(number, text)
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a finite size")
    return Amount(bytes=int(number))


def _fraction(value: float, text: str) -> Amount:
    if not (0 <= value < 1) or not math.isfinite(value):
        raise ValueError(f"{text!r}: a fraction must be at least 0 and below 1")
    return Amount(fraction=value)

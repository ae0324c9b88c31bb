"""Byte sizes: the one rule every size flag reads them by, and the one way k2 prints them.

The rule is IEC's: K, M, G and T are powers of 1000 (80G is 80 * 10^9 bytes, as GPU, disk and RAM makers count) and
Ki, Mi, Gi and Ti powers of 1024, each with or without a trailing B; a bare number is bytes. Printed sizes are binary
(GiB, MiB, KiB), so a printed figure read back with its unit means the same bytes.
"""
import re
from decimal import Decimal

from runtime.errors import K2Error

SIZE_RULE = "K, M, G, T (with or without B) count powers of 1000, Ki, Mi, Gi, Ti powers of 1024; a bare number is bytes"
SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?))?b?\s*", re.IGNORECASE)
PREFIXES = "kmgt"
BINARY_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
UNIT_BYTES = dict(BINARY_UNITS, B=1)


def parse_size(text: str, flag: str) -> int:
    """A size flag's value in bytes: '80G' -> 80_000_000_000, '80GiB' -> 85_899_345_920, '1.5T', '4096'."""
    match = SIZE.fullmatch(text)
    if not match:
        raise K2Error(f"cannot read {flag} {text!r} as a size: write e.g. 80G (80 * 1000^3 bytes), 80GiB "
                      "(80 * 1024^3 bytes), 1.5T, 512MiB or 4096 (bytes)")
    number, prefix, binary = match.groups()
    scale = (1024 if binary else 1000) ** (PREFIXES.index(prefix.lower()) + 1) if prefix else 1
    return int(Decimal(number) * scale)  # Decimal: 1.1K is 1100 bytes, not 1099.9999


def format_bytes(nbytes: float, unit: str | None = None) -> str:
    """'1.50 GiB', '512.00 MiB', '900 B': the largest unit the size reaches. With `unit` (from `table_unit`), that
    unit with one decimal and no space ('75.0GiB'), for table columns whose rows must compare at a glance."""
    if unit is not None:
        return f"{nbytes:,.0f}B" if unit == "B" else f"{nbytes / UNIT_BYTES[unit]:,.1f}{unit}"
    for name, size in BINARY_UNITS:
        if abs(nbytes) >= size:
            return f"{nbytes / size:,.2f} {name}"
    return f"{nbytes:.0f} B"


def table_unit(sizes) -> str:
    """The one unit a column of sizes is printed in: the largest one the largest size reaches, so a small model's
    table reads '1.2MiB', not '0.0GiB'."""
    largest = max((abs(n) for n in sizes), default=0)
    return next((name for name, size in BINARY_UNITS if largest >= size), "B")


def format_shortfall(need: int, free: int) -> str:
    """'10.00 MiB free, 10.00 MiB needed: 312 B short': the shortfall in its own unit, so a small one still shows."""
    return f"{format_bytes(free)} free, {format_bytes(need)} needed: {format_bytes(need - free)} short"

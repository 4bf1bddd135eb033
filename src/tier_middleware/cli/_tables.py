"""Aligned text tables and prices, as `check` and `demo` print them."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    left: int = 1,
    indent: str = "  ",
    widths: Sequence[int] | None = None,
) -> list[str]:
    """Aligned columns two spaces apart: the first `left` left-aligned, the others right-aligned.

    `widths` (from `column_widths`) lines up several tables; by default each column is as wide
    as its widest cell."""
    if widths is None:
        widths = column_widths(header, rows)

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header), *(line(row) for row in rows)]


def column_widths(header: Sequence[str], *tables: Sequence[Sequence[str]]) -> list[int]:
    """The width of each column over the header and the rows of all `tables`."""
    rows = [header, *(row for table in tables for row in table)]
    return [max(len(row[i]) for row in rows) for i in range(len(header))]


def format_price(value: float) -> str:
    """A price per million tokens: at least two decimals, up to four when they matter."""
    text = f"{value:.4f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


__all__ = ["column_widths", "format_price", "format_table"]

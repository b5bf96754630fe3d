"""Plain fixed-width text tables for the CLI: no dependency, aligned columns, numbers right-aligned."""


def render_table(header: tuple[str, ...], rows: list[tuple[str, ...]], numeric: set[int]) -> str:
    """Render rows under a header; columns whose index is in ``numeric`` are right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [cell.rjust(width) if i in numeric else cell.ljust(width) for i, (cell, width) in pairs]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)

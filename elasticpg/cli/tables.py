"""The one table renderer of the benchmark commands: fixed-width text (a row can be printed as
soon as it is measured, as nccl-tests do) and the same table as Markdown for the README."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def num(value: float | None, spec: str) -> str:
    """A number for a table cell; "-" where nothing was measured."""
    return "-" if value is None else format(value, spec)


@dataclass(frozen=True)
class Column:
    name: str
    width: int = 0  # 0: as wide as the widest cell (only when all rows are known)
    left: bool = False  # text columns; numbers align right


class Table:
    def __init__(self, *columns: Column) -> None:
        self.columns = columns

    def _widths(self, rows: Sequence[Sequence[str]]) -> list[int]:
        return [c.width or max([len(c.name), *(len(r[i]) for r in rows)])
                for i, c in enumerate(self.columns)]

    def _line(self, cells: Sequence[str], widths: Sequence[int]) -> str:
        return " | ".join(x.ljust(w) if c.left else x.rjust(w)
                          for c, x, w in zip(self.columns, cells, widths, strict=True))

    def header(self, rows: Sequence[Sequence[str]] = ()) -> str:
        widths = self._widths(rows)
        return (self._line([c.name for c in self.columns], widths) + "\n"
                + "-+-".join("-" * w for w in widths))

    def row(self, cells: Sequence[str], rows: Sequence[Sequence[str]] = ()) -> str:
        """One row; with `rows`, aligned to all of them (else to the fixed widths)."""
        return self._line(cells, self._widths(rows or [cells]))

    def text(self, rows: Sequence[Sequence[str]]) -> str:
        return "\n".join([self.header(rows), *(self.row(r, rows) for r in rows)])

    def markdown(self, rows: Sequence[Sequence[str]]) -> str:
        align = ["---" if c.left else "---:" for c in self.columns]
        lines = ["| " + " | ".join(c.name for c in self.columns) + " |",
                 "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)

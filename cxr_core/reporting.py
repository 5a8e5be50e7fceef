"""Markdown tables and number formatting for the generated reports (one writer for every report).

Every committed ``*.md`` report (evaluation, sweep leaderboard, robustness, audit, benchmarks,
chart validation) is rendered from its JSON by its own command; they share these few helpers so
a table looks the same everywhere and ``None`` always reads ``n/a``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def json_ready(value: Any, digits: int | None = None) -> Any:
    """A report's numbers as strict JSON: numpy -> Python, NaN/inf -> None, tuples -> lists, keys -> str.

    ``json.dumps`` would write NaN as the non-JSON ``NaN`` and refuse numpy scalars; ``digits``
    rounds floats where a report shows no more (the drift summary keeps 6).
    """
    if isinstance(value, Mapping):
        return {str(key): json_ready(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item, digits) for item in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist(), digits)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            return None
        return number if digits is None else round(number, digits)
    if hasattr(value, "item"):  # other numpy-like scalars
        return json_ready(value.item(), digits)
    return value


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: floats to ``digits`` decimals, ``None`` as ``n/a``, everything else as ``str``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_interval(interval: Sequence[float] | None, digits: int = 3) -> str:
    """`` [low, high]`` appended to a point estimate; empty when there is no interval."""
    return "" if not interval else f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def fmt_signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


_SEPARATORS = {"l": "---", "r": "---:", "c": ":---:"}


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]],
                   align: Sequence[str] | None = None) -> list[str]:
    """GitHub-flavoured Markdown table lines (header, separator, one line per row).

    ``align``: one of ``l``/``r``/``c`` per column (a string such as ``"lrr"`` does); left where
    absent. Numbers read best right-aligned, which is why the benchmark tables ask for it.
    """
    align = align if align is not None else "l" * len(header)
    if len(align) != len(header) or any(a not in _SEPARATORS for a in align):
        raise ValueError(f"align {align!r}: one of l/r/c for each of the {len(header)} columns")
    lines = ["| " + " | ".join(str(cell) for cell in header) + " |",
             "|" + "".join(_SEPARATORS[a] + "|" for a in align)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines

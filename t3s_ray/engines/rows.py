"""Rows between Ray Data and the engines: numpy values to plain Python, a numpy batch to rows and back."""

from __future__ import annotations

from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """Ray Data hands list columns and numbers back as numpy arrays and scalars; the engines and the
    driver want plain Python values (nested arrays become nested lists)."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A ``batch_format="numpy"`` batch as one dict of plain values per row."""
    keys = list(batch)
    return [{k: plain(batch[k][i]) for k in keys} for i in range(len(batch[keys[0]]))]


def rows_batch(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Rows back as a batch's columns (the first row's keys); no rows, no columns."""
    return {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}

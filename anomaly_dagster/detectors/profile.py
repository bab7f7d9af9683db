"""Per-time-of-day robust statistics, shared by the z-score and IQR detectors.

Traffic has a strong daily cycle, so "normal" at 03:00 is not "normal" at 14:00. With a
training window of a few days each 10-minute slot has only a few samples, so a slot's
statistics pool the slots within ``window`` of it (circularly, across midnight).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd


def slots_of(frame: pd.DataFrame, window: int | None) -> np.ndarray:
    """Slot index per row, or all zeros when the detector is not time-of-day aware."""
    if window is None:
        return np.zeros(len(frame), dtype=np.int64)
    if "slot" not in frame.columns:
        raise KeyError("time-of-day statistics need the 'slot' column of the features table")
    return frame["slot"].to_numpy(dtype=np.int64)


def slot_statistics(
    values: np.ndarray,
    slots: np.ndarray,
    n_slots: int,
    window: int | None,
    reducer: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """(n_slots, ...) result of ``reducer`` over the rows of each slot's circular neighbourhood.

    With ``window`` None there is one slot holding every row. ``reducer`` takes an (m, d)
    array (NaN rows already removed) and returns a fixed-shape array whose last axis is the feature.
    A feature with no finite value in the whole window gets NaN statistics (it is not scored, as a
    missing value is not) instead of leaving the other features without a single row.
    """
    measured = np.isfinite(values).any(axis=0)
    finite = np.isfinite(values[:, measured]).all(axis=1)
    values, slots = values[finite][:, measured], slots[finite]
    if len(values) == 0:
        raise ValueError("cannot fit on a window with no finite rows")
    if window is None:
        result = reducer(values)[np.newaxis, ...]
    else:
        results = []
        for slot in range(n_slots):
            distance = np.abs(slots - slot)
            distance = np.minimum(distance, n_slots - distance)
            chosen = values[distance <= window]
            results.append(reducer(chosen if len(chosen) else values))
        result = np.stack(results)
    if measured.all():
        return result
    full = np.full((*result.shape[:-1], len(measured)), np.nan)
    full[..., measured] = result
    return full

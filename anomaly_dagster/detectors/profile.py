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
    array (NaN rows already removed) and returns a fixed-shape array.
    """
    finite = np.isfinite(values).all(axis=1)
    values, slots = values[finite], slots[finite]
    if len(values) == 0:
        raise ValueError("cannot fit on a window with no finite rows")
    if window is None:
        return reducer(values)[np.newaxis, ...]
    results = []
    for slot in range(n_slots):
        distance = np.abs(slots - slot)
        distance = np.minimum(distance, n_slots - distance)
        chosen = values[distance <= window]
        results.append(reducer(chosen if len(chosen) else values))
    return np.stack(results)

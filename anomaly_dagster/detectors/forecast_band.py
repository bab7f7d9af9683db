"""Forecast-band detectors: a lower / median / upper value per bucket and feature, calibrated to cover.

A band says what each feature should look like in a bucket and how far it may stray. A raw 1% / 99%
band holds far fewer than 98% of a new day's buckets: several features must all be inside, a slot
has few samples, levels shift from day to day, and a forecast model's quantiles are too narrow (on
the reference clickstream the raw seasonal band held 84% of normal buckets). So every band is
widened around its median until
``coverage`` of the training buckets fall inside a band that did not see them (a held-out day, a
backtest forecast): the share of a normal day's buckets outside the band is then known before
anything is scored.

The score of a bucket is how far its worst feature lies outside the band, in units of the band's
half-width on that side (0 inside), so "2" means twice as far out as the band is wide.
:class:`SeasonalBandDetector` is the fast default: robust per time-of-day slot quantiles of the
training window. ``detectors/deepar.py`` forecasts the band with DeepAR instead.
"""

from __future__ import annotations

from abc import abstractmethod
from statistics import NormalDist
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from anomaly_dagster.detectors.base import Assessment, Detector
from anomaly_dagster.detectors.profile import slot_statistics, slots_of

QUANTILES = (0.01, 0.5, 0.99)
# normal distribution: (99% quantile - median) / (75% quantile - median) = 2.326 / 0.674
QUARTILE_TO_TAIL = NormalDist().inv_cdf(0.99) / NormalDist().inv_cdf(0.75)
BAND_SUFFIXES = ("q01", "q50", "q99")
# a training day that needs this many times the median day's stretch holds a fault, not normal variation
FAULT_DAY_RATIO = 3.0


def widen_factors(
    values: np.ndarray, raw: np.ndarray, coverage: float, days: np.ndarray | None = None
) -> np.ndarray:
    """(d,) factors by which to stretch each feature's band around its median so ``coverage`` of rows fit.

    ``raw`` is (3, n, d): lower, median, upper. Each feature gets a 1 - (1 - coverage) / d share
    (Bonferroni), so all features are inside together for at least ``coverage`` of the rows while no
    single noisy feature sets everybody's width. Rows without a band (NaN) are ignored.

    With ``days`` (a label per row) and at least 3 of them, a day whose own factor for a feature is over
    :data:`FAULT_DAY_RATIO` times the median day's holds a fault and is left out for that feature: the
    band says what a normal day looks like, and one 40-minute outage in the window stretched it 4-7
    times, wide enough to miss the next faults for a week.
    """
    lower, median, upper = raw
    needed = np.where(
        values > median, (values - median) / (upper - median), (median - values) / (median - lower)
    )
    share = 1.0 - (1.0 - coverage) / values.shape[1]
    factors = np.ones(values.shape[1])
    for column in range(values.shape[1]):
        usable = np.isfinite(needed[:, column])
        if days is not None:
            usable &= ~np.isin(days, _fault_days(needed[:, column], usable, days, share))
        if usable.any():
            factors[column] = np.quantile(needed[usable, column], share, method="higher")
    return np.where(factors > 0, factors, 1.0)  # a feature that never left its median keeps its raw width


def _fault_days(needed: np.ndarray, usable: np.ndarray, days: np.ndarray, share: float) -> list[object]:
    """The days whose own stretch for one feature is over FAULT_DAY_RATIO times the median day's."""
    labels = np.unique(days[usable])
    if len(labels) < 3:
        return []  # two days cannot say which of them is the normal one
    own = np.array(
        [np.quantile(needed[usable & (days == label)], share, method="higher") for label in labels]
    )
    typical = float(np.median(own))
    return list(labels[own > FAULT_DAY_RATIO * typical]) if typical > 0 else []


def widen(raw: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """The (3, n, d) band ``raw`` stretched around its median by per-feature ``factors``."""
    lower, median, upper = raw
    return np.stack([median - factors * (median - lower), median, median + factors * (upper - median)])


class BandDetector(Detector):
    """Scoring, explanation and the band table for every detector that can produce a calibrated band."""

    scores_partial_rows: ClassVar[bool] = True

    @abstractmethod
    def bounds(self, frame: pd.DataFrame) -> np.ndarray:
        """(3, n, d) calibrated lower, median and upper value per row and feature (NaN: no band)."""

    def band(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``<feature>_q01, _q50, _q99`` per row: the calibrated lower bound, median and upper bound."""
        bounds = self.bounds(frame)
        columns = {
            f"{feature}_{suffix}": bounds[position, :, column]
            for column, feature in enumerate(self.features)
            for position, suffix in enumerate(BAND_SUFFIXES)
        }
        return pd.DataFrame(columns, index=frame.index)

    def explain(self, frame: pd.DataFrame) -> np.ndarray:
        """Signed distance outside the band in half-widths: > 0 above the upper bound, < 0 below the lower."""
        return self._outside(frame, self.bounds(frame))

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        return _worst(self.explain(frame))

    def expected(self, frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(self.bounds(frame)[1], columns=self.features, index=frame.index)

    def scored_rows(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows with a measured feature that has a band: before its first full context a DeepAR row has
        none, and its placeholder 0 would pull the threshold down (by 8-19% in a week's window)."""
        return self._measured(frame, self.bounds(frame))

    def assess(self, frame: pd.DataFrame, history: pd.DataFrame | None = None) -> Assessment:
        """All of it from one band: a DeepAR band is a forecast, too slow to make once per output."""
        bounds = self.bounds(frame)
        outside = self._outside(frame, bounds)
        expected = pd.DataFrame(bounds[1], columns=self.features, index=frame.index)
        return Assessment(_worst(outside), outside, self._measured(frame, bounds), expected, bounds)

    def _measured(self, frame: pd.DataFrame, bounds: np.ndarray) -> np.ndarray:
        return (np.isfinite(self.matrix(frame)) & np.isfinite(bounds).all(axis=0)).any(axis=1)

    def _outside(self, frame: pd.DataFrame, bounds: np.ndarray) -> np.ndarray:
        lower, median, upper = bounds
        values = self.matrix(frame)
        above = np.maximum(values - upper, 0.0) / (upper - median)
        below = np.maximum(lower - values, 0.0) / (median - lower)
        return above - below


def _worst(outside: np.ndarray) -> np.ndarray:
    """A row's score: its farthest feature outside the band (0 where no feature has one)."""
    return np.nan_to_num(np.abs(outside), nan=0.0).max(axis=1)


def day_labels(frame: pd.DataFrame) -> np.ndarray:
    """Which day each row belongs to: the date of ``bucket_start``, else a new day wherever ``slot`` wraps."""
    if "bucket_start" in frame.columns:
        return pd.to_datetime(frame["bucket_start"]).dt.normalize().to_numpy()
    if "slot" in frame.columns:
        return np.r_[0, np.cumsum(np.diff(frame["slot"].to_numpy()) < 0)]
    return np.zeros(len(frame), dtype=np.int64)


def _quantile_band(values: np.ndarray) -> np.ndarray:
    """Median and robust 1% / 99% quantiles: each side's quartile distance scaled as for a normal tail.

    A slot pools 7 buckets a day, so its raw 1% / 99% quantiles are nearly its minimum and maximum:
    one anomaly in the window moves them, and they cover the next day badly. Quartiles are stable;
    the widening calibration then corrects for tails heavier than normal.
    """
    q25, median, q75 = np.quantile(values, (0.25, 0.5, 0.75), axis=0)
    spread = np.std(values, axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    # a side of zero width (a slot that is always 0 at night) would make any step infinitely anomalous
    lower = np.where(median > q25, median - QUARTILE_TO_TAIL * (median - q25), median - spread)
    upper = np.where(q75 > median, median + QUARTILE_TO_TAIL * (q75 - median), median + spread)
    return np.stack([lower, median, upper])


class SeasonalBandDetector(BandDetector):
    """Per time-of-day slot robust 1% / 50% / 99% quantiles of the training window, widened to ``coverage``.

    Params: ``time_of_day_window`` (slots pooled each side, circularly; None = one global band),
    ``n_slots``, ``coverage`` (share of a normal day's buckets the calibrated band should hold).
    Rows need the ``slot`` column; ``bucket_start``, when present, tells the training days apart.
    """

    kind: ClassVar[str] = "seasonal_band"

    def __init__(
        self,
        features: list[str],
        time_of_day_window: int | None = 3,
        n_slots: int = 144,
        coverage: float = 0.99,
    ) -> None:
        if not 0.0 < coverage < 1.0:
            raise ValueError(f"coverage must be between 0 and 1, got {coverage}")
        super().__init__(features, time_of_day_window=time_of_day_window, n_slots=n_slots, coverage=coverage)
        self.window = time_of_day_window
        self.n_slots = n_slots
        self.coverage = coverage
        self.quantiles: np.ndarray | None = None  # (slots, 3, d): raw lower, median, upper
        self.factors: np.ndarray | None = None  # (d,): calibration stretch around the median

    def fit(self, frame: pd.DataFrame) -> SeasonalBandDetector:
        """Quantiles from every training row; widening calibrated on each day against the other days.

        A slot's in-sample quantiles hug the very points they were computed from, so they cover the
        training window better than the next day (about 95% instead of 99% at a week of data).
        Calibrating each day against the band fitted without it gives the coverage a new day sees;
        a one-day window can only be calibrated in sample.
        """
        values, slots = self.matrix(frame), slots_of(frame, self.window)
        self.quantiles = self._profile(values, slots)
        days = day_labels(frame)
        if len(np.unique(days)) < 2:
            self.factors = widen_factors(values, self._raw(slots), self.coverage)
            return self
        held_out = np.full((3, *values.shape), np.nan)  # NaN: a day with nothing to hold it against
        measured = np.isfinite(values).any(axis=0)  # a feature never measured has no band at all
        for day in np.unique(days):
            held = days == day
            if not np.isfinite(values[~held][:, measured]).all(axis=1).any():  # the other days had no data
                continue
            quantiles = self._profile(values[~held], slots[~held])
            held_out[:, held] = np.moveaxis(quantiles[slots[held]], 1, 0)
        self.factors = widen_factors(values, held_out, self.coverage, days)
        # a feature no day could be held out for (its only data on one day) is calibrated in sample
        held_for = (np.isfinite(values) & np.isfinite(held_out).all(axis=0)).any(axis=0)
        if not held_for.all():
            in_sample = widen_factors(values, self._raw(slots), self.coverage)
            self.factors = np.where(held_for, self.factors, in_sample)
        return self

    def _profile(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return slot_statistics(values, slots, self.n_slots, self.window, _quantile_band)

    def _raw(self, slots: np.ndarray) -> np.ndarray:
        if self.quantiles is None:
            raise RuntimeError("fit the detector before scoring")
        return np.moveaxis(self.quantiles[slots], 1, 0)

    def bounds(self, frame: pd.DataFrame) -> np.ndarray:
        return widen(self._raw(slots_of(frame, self.window)), self.factors)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"quantiles": self.quantiles, "factors": self.factors}, {}

    @classmethod
    def from_state(
        cls, features: list[str], params: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> SeasonalBandDetector:
        detector = cls(features, **params)
        detector.quantiles = arrays["quantiles"]
        detector.factors = arrays["factors"]
        return detector

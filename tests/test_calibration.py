"""Thresholds from training-window scores, on data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomaly_dagster.calibration import Threshold, calibrate
from anomaly_dagster.config import ThresholdConfig


def test_sigma_is_mean_plus_k_population_sd() -> None:
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, population sd sqrt(2)
    threshold = calibrate(scores, ThresholdConfig(method="sigma", k=3.0))
    assert threshold.method == "sigma"
    assert threshold.value == pytest.approx(3.0 + 3.0 * math.sqrt(2.0))
    assert threshold.params == {"k": 3.0, "mean": 3.0, "sd": pytest.approx(math.sqrt(2.0))}


def test_sigma_follows_k() -> None:
    scores = np.array([0.0, 10.0])  # mean 5, sd 5
    assert calibrate(scores, ThresholdConfig(method="sigma", k=1.0)).value == pytest.approx(10.0)
    assert calibrate(scores, ThresholdConfig(method="sigma", k=2.5)).value == pytest.approx(17.5)


def test_non_finite_scores_are_ignored() -> None:
    scores = np.array([1.0, np.nan, 2.0, np.inf, 3.0, -np.inf, 4.0, 5.0])
    threshold = calibrate(scores, ThresholdConfig(method="sigma", k=3.0))
    assert threshold.value == pytest.approx(3.0 + 3.0 * math.sqrt(2.0))
    quantile = calibrate(scores, ThresholdConfig(method="quantile", quantile=0.5))
    assert quantile.value == pytest.approx(3.0)


def test_quantile_interpolates_linearly() -> None:
    scores = np.arange(101, dtype=float)  # 0..100: the q-quantile is 100 q
    for q in (0.5, 0.9, 0.99, 0.995):
        threshold = calibrate(scores, ThresholdConfig(method="quantile", quantile=q))
        assert threshold == Threshold("quantile", pytest.approx(100 * q), {"quantile": q})


def test_quantile_flags_the_expected_share() -> None:
    scores = np.random.default_rng(0).exponential(size=10_000)
    value = calibrate(scores, ThresholdConfig(method="quantile", quantile=0.99)).value
    assert (scores > value).mean() == pytest.approx(0.01, abs=0.0005)
    assert value == pytest.approx(math.log(100), rel=0.05)  # exponential(1): 99th percentile ln 100


def test_fixed_ignores_scores_even_when_there_are_none() -> None:
    config = ThresholdConfig(method="fixed", value=4.2)
    assert calibrate(np.array([100.0, 200.0]), config) == Threshold("fixed", 4.2, {})
    assert calibrate(np.array([]), config).value == 4.2
    assert calibrate(np.array([np.nan]), config).value == 4.2


@pytest.mark.parametrize("method", ["sigma", "quantile"])
def test_no_finite_scores_is_an_error(method: str) -> None:
    with pytest.raises(ValueError, match="no finite scores"):
        calibrate(np.array([np.nan, np.inf]), ThresholdConfig(method=method))


def test_calibrate_accepts_lists_and_returns_plain_floats() -> None:
    threshold = calibrate([1, 2, 3], ThresholdConfig(method="sigma", k=0.0))
    assert type(threshold.value) is float
    assert threshold.value == 2.0
    assert threshold.to_dict() == {
        "method": "sigma",
        "value": 2.0,
        "params": {"k": 0.0, "mean": 2.0, "sd": pytest.approx(math.sqrt(2 / 3))},
    }


def test_constant_scores_give_their_value() -> None:
    threshold = calibrate(np.full(50, 0.7), ThresholdConfig(method="sigma", k=3.0))
    assert threshold.value == pytest.approx(0.7)
    assert threshold.params["sd"] == pytest.approx(0.0)

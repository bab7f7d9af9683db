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
    threshold = calibrate([1, 2, 3], ThresholdConfig(method="sigma", k=1.0))  # the config requires k > 0
    assert type(threshold.value) is float
    assert threshold.value == pytest.approx(2.0 + math.sqrt(2 / 3))
    assert threshold.to_dict() == {
        "method": "sigma",
        "value": pytest.approx(2.0 + math.sqrt(2 / 3)),
        "params": {"k": 1.0, "mean": 2.0, "sd": pytest.approx(math.sqrt(2 / 3))},
    }


def test_constant_scores_give_their_value() -> None:
    threshold = calibrate(np.full(50, 0.7), ThresholdConfig(method="sigma", k=3.0))
    assert threshold.value == pytest.approx(0.7)
    assert threshold.params["sd"] == pytest.approx(0.0)


# --- peaks over threshold --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pot_matches_the_exponential_quantile(seed: int) -> None:
    rate, risk = 2.0, 1e-4
    scores = np.random.default_rng(seed).exponential(scale=1 / rate, size=50_000)
    threshold = calibrate(scores, ThresholdConfig(method="pot", risk=risk, initial_quantile=0.98))
    assert threshold.method == "pot"
    assert "fallback" not in threshold.params
    assert threshold.value == pytest.approx(-math.log(risk) / rate, rel=0.1)  # ln(1e4) / 2 = 4.61
    assert threshold.params["excesses"] == 1000
    assert abs(threshold.params["shape"]) < 0.1  # the exponential is the shape-0 GPD
    # memoryless: the excesses are Exp(rate) again
    assert threshold.params["scale"] == pytest.approx(1 / rate, rel=0.15)


def test_pot_extrapolates_a_heavy_tail() -> None:
    # Pareto(alpha=3) on [1, inf): P(S > z) = z ** -3, so the risk-r quantile is r ** (-1/3), GPD shape 1/3
    risk = 1e-5
    scores = np.random.default_rng(3).pareto(3.0, size=50_000) + 1.0
    threshold = calibrate(scores, ThresholdConfig(method="pot", risk=risk, initial_quantile=0.98))
    assert threshold.params["shape"] == pytest.approx(1 / 3, abs=0.1)
    assert threshold.value == pytest.approx(risk ** (-1 / 3), rel=0.25)  # 46.4
    assert threshold.value > scores.max()  # beyond anything seen: what a quantile cannot do


def test_pot_with_mostly_zero_scores_fits_the_positive_tail() -> None:
    # a band detector scores 0 inside its band: the tail is the few positive scores
    rng = np.random.default_rng(4)
    scores = np.where(rng.random(100_000) < 0.03, rng.exponential(size=100_000), 0.0)
    threshold = calibrate(scores, ThresholdConfig(method="pot", risk=1e-3, initial_quantile=0.9))
    assert threshold.params["initial_threshold"] == 0.0
    # P(S > z) = 0.03 exp(-z) = 1e-3  =>  z = ln 30
    assert threshold.value == pytest.approx(math.log(30), rel=0.1)


def test_pot_falls_back_to_the_initial_quantile_on_too_few_excesses() -> None:
    scores = np.arange(100, dtype=float)  # 0.98 quantile 97.02: two excesses
    threshold = calibrate(scores, ThresholdConfig(method="pot", initial_quantile=0.98))
    assert threshold.value == pytest.approx(97.02)
    assert threshold.params["fallback"] == "initial_quantile"
    assert threshold.params["reason"] == "2 excesses"


def test_pot_falls_back_on_constant_scores_and_constant_excesses() -> None:
    constant = calibrate(np.full(1000, 0.5), ThresholdConfig(method="pot"))
    assert constant.value == 0.5
    assert constant.params["fallback"] == "initial_quantile"
    two_levels = np.r_[np.zeros(900), np.full(100, 7.0)]  # every excess is the same 7
    flat = calibrate(two_levels, ThresholdConfig(method="pot", initial_quantile=0.8))
    assert flat.value == 0.0
    assert (flat.params["fallback"], flat.params["reason"]) == ("initial_quantile", "constant excesses")


def test_pot_reads_a_risk_inside_the_body_off_the_data() -> None:
    scores = np.random.default_rng(5).exponential(size=10_000)
    threshold = calibrate(scores, ThresholdConfig(method="pot", risk=0.05, initial_quantile=0.98))
    assert threshold.value == pytest.approx(np.quantile(scores, 0.95))
    assert threshold.params["fallback"] == "empirical_quantile"


# --- best F1 ---------------------------------------------------------------------------------------------


def best_f1_by_brute_force(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for cut in np.unique(scores):
        flagged = scores > cut
        caught = int((flagged & labels).sum())
        best = max(best, 2 * caught / (flagged.sum() + labels.sum()))
    return best


def test_best_f1_finds_the_perfect_cut() -> None:
    rng = np.random.default_rng(6)
    normal, anomalous = rng.uniform(0, 1, 500), rng.uniform(2, 3, 20)
    scores = rng.permutation(np.r_[normal, anomalous])
    labels = scores >= 2
    threshold = calibrate(scores, ThresholdConfig(method="best_f1"), labels=labels)
    assert threshold.method == "best_f1"
    assert threshold.value == normal.max()  # the highest cut that still flags every anomaly
    assert ((scores > threshold.value) == labels).all()
    assert threshold.params == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "positives": 20}


def test_best_f1_on_overlapping_scores_is_the_best_possible() -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(2000) < 0.05
    scores = rng.normal(size=2000) + 2.0 * labels
    threshold = calibrate(scores, ThresholdConfig(method="best_f1"), labels=labels.astype(int))
    flagged = scores > threshold.value
    f1 = 2 * (flagged & labels).sum() / (flagged.sum() + labels.sum())
    assert threshold.params["f1"] == pytest.approx(f1)
    assert f1 == pytest.approx(best_f1_by_brute_force(scores, labels))
    assert 0.0 < threshold.params["recall"] < 1.0


def test_best_f1_prefers_the_highest_of_equally_good_cuts() -> None:
    scores = np.array([0.0, 1.0, 2.0, 5.0, 6.0])
    labels = np.array([0, 0, 0, 1, 1])
    assert calibrate(scores, ThresholdConfig(method="best_f1"), labels=labels).value == 2.0


def test_best_f1_drops_non_finite_scores_with_their_labels() -> None:
    scores = np.array([0.1, np.nan, 0.2, 3.0, np.inf, 4.0])
    labels = np.array([0, 1, 0, 1, 1, 1])
    threshold = calibrate(scores, ThresholdConfig(method="best_f1"), labels=labels)
    assert threshold.value == 0.2
    assert threshold.params["positives"] == 2


@pytest.mark.parametrize(("labels", "reason"), [(None, "no labels"), (np.zeros(5), "no positive labels")])
def test_best_f1_without_positives_falls_back_to_sigma(labels, reason: str) -> None:
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    threshold = calibrate(scores, ThresholdConfig(method="best_f1", k=3.0), labels=labels)
    assert threshold.method == "best_f1"
    assert threshold.value == pytest.approx(3.0 + 3.0 * math.sqrt(2.0))
    assert threshold.params["fallback"] == "sigma"
    assert threshold.params["reason"] == reason
    assert threshold.params["k"] == 3.0


def test_best_f1_labels_must_align_with_scores() -> None:
    with pytest.raises(ValueError, match="must align"):
        calibrate(np.arange(5.0), ThresholdConfig(method="best_f1"), labels=np.ones(4))


def test_labels_do_not_change_the_other_methods() -> None:
    scores = np.random.default_rng(8).exponential(size=1000)
    labels = scores > 3
    for method in ("sigma", "quantile", "pot"):
        config = ThresholdConfig(method=method)
        assert calibrate(scores, config, labels=labels) == calibrate(scores, config)

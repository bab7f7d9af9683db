"""Behaviour of our Robust Random Cut Forest: ranking, AWS-style attribution, agreement with rrcf,
forgetting with time decay, exact persistence and determinism, and the pipeline adapter."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from numba import njit
from scipy.stats import spearmanr

import anomaly_dagster.detectors as registry
from anomaly_dagster.detectors import rcf
from anomaly_dagster.detectors.base import load_detectors, save_detectors
from anomaly_dagster.detectors.rcf import RandomCutForest, RCFDetector, fold_attribution

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # rrcf imports the deprecated pkg_resources
    import rrcf

LOW, HIGH = 0, 1


def gaussian(n: int, dims: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dims))


def periodic(n: int, seed: int = 0) -> np.ndarray:
    """A smooth periodic 2-dim series with noise: what shingling is for."""
    phase = 2 * np.pi * np.arange(n) / 48
    noise = np.random.default_rng(seed).normal(scale=0.05, size=(n, 2))
    return np.column_stack([np.sin(phase), np.cos(phase)]) + noise


def check_tree_invariants(forest: RandomCutForest) -> None:
    """Every tree: masses add up, boxes are the union of the children, cuts separate the children,
    and the sampler's leaves are exactly the tree's leaves with matching multiplicity."""
    arrays, _ = forest.state()
    links, cut_val, mass, box = arrays["links"], arrays["cut_val"], arrays["mass"], arrays["box"]
    for t, root in enumerate(arrays["root"]):
        held = arrays["heap_leaf"][t, : arrays["heap_n"][t]]
        if root < 0:
            assert len(held) == 0
            continue
        counts = dict(zip(*np.unique(held, return_counts=True), strict=True))
        leaves: dict[int, int] = {}
        stack = [(int(root), -1)]
        while stack:
            node, parent = stack.pop()
            assert links[t, node, 3] == parent
            if links[t, node, 0] < 0:
                assert np.array_equal(box[t, node, 0], box[t, node, 1])
                leaves[node] = int(mass[t, node])
                continue
            left, right = links[t, node, 1], links[t, node, 2]
            dim, cut = links[t, node, 0], cut_val[t, node]
            assert mass[t, node] == mass[t, left] + mass[t, right]
            assert np.array_equal(box[t, node, 0], np.minimum(box[t, left, 0], box[t, right, 0]))
            assert np.array_equal(box[t, node, 1], np.maximum(box[t, left, 1], box[t, right, 1]))
            assert box[t, left, 1, dim] <= cut < box[t, right, 0, dim]
            stack += [(int(left), node), (int(right), node)]
        assert leaves == counts
        assert arrays["n_free"][t] == links.shape[1] - 2 * len(leaves) + 1


def test_planted_outliers_rank_first_on_the_aws_scale() -> None:
    data = gaussian(2000)
    planted = np.array([[6, 0, 0], [0, -6, 0], [0, 0, 7], [4, 4, -4], [-5, 5, 0]], dtype=float)
    rows = np.vstack([data, planted])
    scores = RandomCutForest(random_state=1).fit(rows).score(rows)
    assert set(np.argsort(scores)[-5:]) == set(range(2000, 2005))
    typical = np.median(scores[:2000])
    assert 0.5 < typical < 1.5  # AWS scale: ordinary points score about 1 ...
    assert scores[2000:].min() > 3 * typical  # ... and isolated ones several times more


@pytest.mark.parametrize("shingle_size", [1, 4])
def test_attribution_names_the_perturbed_dimension_and_direction(shingle_size: int) -> None:
    data = gaussian(1500)
    forest = RandomCutForest(shingle_size=shingle_size, random_state=2).fit(data)
    spike, drop = data[-20:].copy(), data[-20:].copy()
    spike[-1, 1] += 8.0
    drop[-1, 2] -= 8.0
    for query, dim, direction in ((spike, 1, HIGH), (drop, 2, LOW)):
        raw = fold_attribution(forest.attribution(query), shingle_size)[-1]
        assert np.unravel_index(np.argmax(raw), raw.shape) == (dim, direction)
        assert raw[dim, direction] > 0.5 * raw.sum()


@pytest.mark.parametrize("shingle_size", [1, 3])
def test_attributions_sum_to_the_score(shingle_size: int) -> None:
    data = gaussian(600, seed=3)
    forest = RandomCutForest(num_trees=30, sample_size=64, shingle_size=shingle_size, random_state=3).fit(
        data
    )
    # Training rows include exact duplicates of sampled points: the "seen" branch with shadow boxes.
    query = np.vstack([data[:100], gaussian(50, seed=4) * 3])
    attribution = forest.attribution(query)
    scores = forest.score(query)
    assert attribution.shape == (150, 3 * shingle_size, 2)
    assert (attribution >= 0).all()
    assert np.allclose(attribution.sum(axis=(1, 2)), scores)
    assert scores[shingle_size - 1 :].min() > 0


def test_scores_rank_like_rrcf_codisp() -> None:
    rng = np.random.default_rng(5)
    data = rng.normal(size=(2000, 3))
    directions = rng.normal(size=(60, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    queries = directions * np.linspace(0.0, 6.0, 60)[:, None]  # graded outlyingness
    ours = RandomCutForest(random_state=5).fit(data).score(queries)

    trees = []
    for seed in range(50):
        sample = data[np.random.default_rng(seed).choice(len(data), 256, replace=False)]
        trees.append(rrcf.RCTree(sample, random_state=seed))
    codisp = np.zeros(len(queries))
    for index, point in enumerate(queries):
        for tree in trees:
            tree.insert_point(point, index="query")
            codisp[index] += tree.codisp("query") / len(trees)
            tree.forget_point("query")
    assert spearmanr(ours, codisp).statistic >= 0.9


def test_time_decay_forgets_an_old_regime_faster() -> None:
    old, new = gaussian(2000, seed=6), gaussian(600, seed=7) + 8.0
    baseline, with_decay, without = [], [], []
    decayed = RandomCutForest(num_trees=50, time_decay=1 / 256, random_state=6)
    uniform = RandomCutForest(num_trees=50, random_state=6)
    for row in old:
        baseline.append(decayed.update(row))
        uniform.update(row)
    for row in new:
        with_decay.append(decayed.update(row))
        without.append(uniform.update(row))
    normal = np.median(baseline[500:])
    after = slice(300, None)  # a few hundred points into the new regime
    assert np.mean(with_decay[after]) < 1.3 * normal
    assert np.mean(without[after]) > 1.25 * np.mean(with_decay[after])


def test_fit_matches_streaming_and_keeps_trees_consistent() -> None:
    series = periodic(700)
    fitted = RandomCutForest(num_trees=20, sample_size=32, shingle_size=4, time_decay=0.01, random_state=8)
    fitted.fit(series)
    streamed = RandomCutForest(num_trees=20, sample_size=32, shingle_size=4, time_decay=0.01, random_state=8)
    streamed.fit(series[:300])
    for row in series[300:]:
        expected = streamed.score(row[None], history=streamed.state()[0]["shingle"].reshape(4, 2)[1:])[0]
        assert streamed.update(row) == expected  # same arithmetic in the same order: exactly equal
    for key, value in fitted.state()[0].items():
        assert np.array_equal(value, streamed.state()[0][key]), key
    check_tree_invariants(streamed)


@njit  # not cached: a cache keyed on this file would miss changes to the rcf intrinsics
def _box_sums(x: np.ndarray, box: np.ndarray) -> tuple[float, float, float]:
    gap, span = rcf._gap_span(x, box[0], box[1])
    return gap, span, rcf._span(box[0], box[1])


@pytest.mark.parametrize("dims", [1, 2, 3, 7, 8, 9, 16, 24, 25])
def test_box_sums_use_the_documented_lane_order(dims: int) -> None:
    rng = np.random.default_rng(dims)
    for _ in range(50):
        x = rng.normal(size=dims).astype(np.float32)
        box = np.sort(rng.normal(size=(2, dims)), axis=0).astype(np.float32)
        lanes = np.zeros((2, 8), np.float32)
        for i in range(dims):
            lanes[0, i % 8] += max(box[0, i] - x[i], x[i] - box[1, i], np.float32(0.0))
            lanes[1, i % 8] += box[1, i] - box[0, i]
        pairs = lanes[:, 0::2] + lanes[:, 1::2]  # float32 all the way, then widened
        gap, span = (float((a + b) + (c + d)) for a, b, c, d in pairs)
        assert _box_sums(x, box) == (gap, span, span)


@pytest.mark.parametrize("shingle_size", [1, 3, 9])  # 3, 9, 27 dims: 8-blocks 0, 1, 3 plus a tail
def test_scores_are_identical_for_any_batch_size_thread_count_and_streaming(
    monkeypatch, shingle_size
) -> None:
    monkeypatch.setattr(rcf, "_TABLE_MIN_POINTS", 64)  # the depth-first tables for the big batch ...
    monkeypatch.setattr(rcf, "_THREAD_MIN_POINTS", 64)  # ... scored by several threads (133-134 points
    # each: SIMD descent lanes and their scalar tail, full and short climb groups, duplicates among them)
    series = gaussian(1200, seed=15)
    series[800::7] = series[200:258]  # every 7th new row repeats a fitted one: some are in the trees
    forest = RandomCutForest(num_trees=20, sample_size=32, shingle_size=shingle_size, random_state=15)
    forest.fit(series[:800])
    rows = series[800:]
    history = series[800 - (shingle_size - 1) : 800]
    monkeypatch.setattr(rcf, "NUM_THREADS", 3)
    batch = forest.score(rows, history=history)
    monkeypatch.setattr(rcf, "NUM_THREADS", 1)
    assert np.array_equal(forest.score(rows, history=history), batch)
    start = 800 - (shingle_size - 1)
    pieces = [forest.score(rows[i : i + 10], history=series[start + i : 800 + i]) for i in range(0, 400, 10)]
    assert np.array_equal(np.concatenate(pieces), batch)  # 10 points: straight on the forest arrays
    assert forest.update(rows[0]) == batch[0]  # streaming: the same arithmetic again


def test_one_point_trees_score_duplicates_as_seen_on_every_path(monkeypatch) -> None:
    monkeypatch.setattr(rcf, "_TABLE_MIN_POINTS", 64)  # the whole series on the tables, pieces not
    series = gaussian(400, seed=17)
    series[::2] = series[0]  # every other row is the one point each tree holds (its leaf is its root)
    forest = RandomCutForest(num_trees=10, sample_size=4, random_state=17).fit(series[:1])
    batch = forest.score(series)
    assert np.array_equal(
        batch, np.concatenate([forest.score(series[i : i + 50]) for i in range(0, 400, 50)])
    )
    assert batch[0] < batch[1:].max() and np.unique(batch[::2]).size == 1


def test_batch_tables_are_rebuilt_after_the_trees_change(monkeypatch) -> None:
    monkeypatch.setattr(rcf, "_TABLE_MIN_POINTS", 64)  # a whole-series score runs on the kept tables
    series = gaussian(1500, seed=16)
    forest = RandomCutForest(num_trees=20, sample_size=32, random_state=16).fit(series[:600])

    def on_forest_arrays() -> np.ndarray:  # 50-point pieces: below the table threshold
        return np.concatenate([forest.score(series[i : i + 50]) for i in range(0, len(series), 50)])

    first = forest.score(series)
    assert np.array_equal(first, on_forest_arrays())
    for row in series[600:900]:
        forest.update(row)
    after_updates = forest.score(series)
    assert not np.array_equal(after_updates, first)
    assert np.array_equal(after_updates, on_forest_arrays())
    forest.fit(series[900:])
    assert np.array_equal(forest.score(series), on_forest_arrays())


def test_duplicates_and_deletions_keep_trees_consistent() -> None:
    rows = np.round(gaussian(3000, seed=9), 1)  # coarse grid: many exact duplicates
    forest = RandomCutForest(num_trees=10, sample_size=24, time_decay=0.05, random_state=9)
    scores = [forest.update(row) for row in rows]
    assert scores[0] == 0.0 and np.isfinite(scores).all()
    check_tree_invariants(forest)


@pytest.mark.parametrize("time_decay", [0.002, None])  # None: the sampler's cached acceptance bound
def test_save_load_resumes_exactly(tmp_path, time_decay) -> None:
    series = periodic(900, seed=10)
    forest = RandomCutForest(
        num_trees=40, sample_size=64, shingle_size=3, time_decay=time_decay, random_state=10
    )
    forest.fit(series[:500])
    for row in series[500:600]:
        forest.update(row)
    path = tmp_path / "forest.npz"
    forest.save(path)
    with np.load(path, allow_pickle=False) as archive:
        assert json.loads(str(archive["meta"]))["shingle_size"] == 3
    loaded = RandomCutForest.load(path)
    assert np.array_equal(loaded.score(series), forest.score(series))
    assert np.array_equal(loaded.attribution(series[:50]), forest.attribution(series[:50]))
    original = [forest.update(row) for row in series[600:]]
    resumed = [loaded.update(row) for row in series[600:]]
    assert original == resumed
    for key, value in forest.state()[0].items():
        assert np.array_equal(value, loaded.state()[0][key]), key


def test_fixed_random_state_gives_identical_results() -> None:
    data = gaussian(800, seed=11)

    def run(seed: int) -> tuple[np.ndarray, list[float]]:
        forest = RandomCutForest(num_trees=30, sample_size=64, random_state=seed).fit(data[:500])
        return forest.score(data), [forest.update(row) for row in data[500:]]

    first, again, other = run(12), run(12), run(13)
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]
    assert not np.array_equal(first[0], other[0])
    refit = RandomCutForest(num_trees=30, sample_size=64, random_state=12)
    assert np.array_equal(refit.fit(data).score(data), refit.fit(data).score(data))


def test_rejects_non_finite_points_without_changing_state() -> None:
    forest = RandomCutForest(num_trees=5, sample_size=8, random_state=0).fit(gaussian(50))
    before = forest.state()[0]
    with pytest.raises(ValueError, match="finite"):
        forest.update(np.array([0.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        forest.score(np.array([[np.inf, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="float32 range"):  # points are float32, as in AWS's library
        forest.update(np.array([0.0, 1e39, 0.0]))
    with pytest.raises(ValueError, match="float32 range"):
        forest.fit(np.array([[0.0, 0.0, -1e39]]))
    for key, value in forest.state()[0].items():
        assert np.array_equal(value, before[key]), key


def test_a_forest_saved_with_float64_boxes_asks_to_be_retrained(tmp_path) -> None:
    forest = RandomCutForest(num_trees=5, sample_size=8, random_state=0).fit(gaussian(50))
    arrays, meta = forest.state()
    old = {**arrays, "box": arrays["box"].astype(np.float64), "cut_val": arrays["cut_val"].astype(np.float64)}
    with pytest.raises(ValueError, match=r"format 1 .* retrain the model"):
        RandomCutForest.from_state(old, {**meta, "format_version": 1})
    # Boxes are float32 (3 cache lines for 24 dims) and a point rounds to float32 on the way in.
    assert arrays["box"].dtype == np.float32 and arrays["cut_val"].dtype == np.float32
    value = np.float32(0.1)
    assert forest.score(np.array([[0.1, 0.1, 0.1]]))[0] == forest.score(np.full((1, 3), value))[0]


def clicks_frame(n: int = 600, seed: int = 14) -> pd.DataFrame:
    """Daily-cycle page/user/click counts on very different scales, 10-minute buckets."""
    rng = np.random.default_rng(seed)
    daily = 1 + 0.5 * np.sin(2 * np.pi * np.arange(n) / 144)
    return pd.DataFrame(
        {
            "page": rng.poisson(12 * daily),
            "user": rng.poisson(70 * daily),
            "click": rng.poisson(300 * daily),
        },
        index=pd.date_range("2020-07-07", periods=n, freq="10min"),
    ).astype(float)


def test_detector_explains_signed_features_and_round_trips(tmp_path, monkeypatch) -> None:
    frame = clicks_frame()
    detector = RCFDetector(["page", "user", "click"], shingle_size=2, random_state=3).fit(frame[:500])
    window = frame[500:].copy()
    window.iloc[50, 1] *= 0.2  # users drop (a "program error")
    window.iloc[80, 2] *= 3.0  # click burst
    scores = detector.score(window, history=frame[:500])
    explanation = detector.explain(window, history=frame[:500])
    assert explanation.shape == (100, 3)
    assert set(np.argsort(scores)[-2:]) <= {50, 51, 80, 81}  # a shingle holds the spike for two rows
    assert np.argmin(explanation[50]) == 1 and explanation[50, 1] < 0
    assert np.argmax(explanation[80]) == 2 and explanation[80, 2] > 0
    assert scores[0] > 0 and detector.score(window)[0] == 0  # without history the first shingle is short

    monkeypatch.setitem(registry.DETECTOR_CLASSES, "rcf", RCFDetector)
    save_detectors(tmp_path / "model.npz", {"rcf_clicks": detector}, {"window": "test"})
    loaded, manifest = load_detectors(tmp_path / "model.npz")
    restored = loaded["rcf_clicks"]
    assert isinstance(restored, RCFDetector) and manifest["window"] == "test"
    assert restored.params == detector.params
    assert np.array_equal(restored.score(window, history=frame[:500]), scores)
    assert np.array_equal(restored.explain(window, history=frame[:500]), explanation)

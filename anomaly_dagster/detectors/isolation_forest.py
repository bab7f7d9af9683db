"""Isolation Forest: scikit-learn fits the trees, we keep them as flat arrays and score them.

Keeping the trees as arrays (children, split feature, threshold, node sizes) makes the model
loadable without pickle and independent of scikit-learn's private attributes; scoring walks
all points through one tree level at a time with NumPy. Scores equal scikit-learn's
``-score_samples`` (the paper's s(x) in (0, 1], ~0.5 is ordinary, near 1 is isolated quickly).

Explanation: for each tree, the split that isolated a point gets the credit for how much
shorter than average its path was, signed by the side taken (above the threshold = HIGH).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from anomaly_dagster.detectors.base import Detector

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest

LEAF = -1


def average_path_length(node_sizes: np.ndarray) -> np.ndarray:
    """c(n): mean path length of an unsuccessful search in a binary search tree of n points."""
    sizes = np.asarray(node_sizes, dtype=np.float64)
    result = np.zeros_like(sizes)
    result[sizes == 2] = 1.0
    big = sizes > 2
    result[big] = 2.0 * (np.log(sizes[big] - 1.0) + np.euler_gamma) - 2.0 * (sizes[big] - 1.0) / sizes[big]
    return result


class IsolationForestDetector(Detector):
    """Params: ``n_estimators``, ``max_samples``, ``random_state`` (as in scikit-learn)."""

    kind: ClassVar[str] = "isolation_forest"

    def __init__(
        self,
        features: list[str],
        n_estimators: int = 100,
        max_samples: int | float | str = 256,
        random_state: int = 0,
    ) -> None:
        # as scikit-learn: a count, a share of the rows in (0, 1], or "auto" (256)
        if max_samples == "auto":
            max_samples = 256
        valid_count = isinstance(max_samples, int) and not isinstance(max_samples, bool) and max_samples >= 1
        valid_share = isinstance(max_samples, float) and 0.0 < max_samples <= 1.0
        if not (valid_count or valid_share):
            raise ValueError(
                f"isolation_forest max_samples must be a count >= 1, a share in (0, 1] or 'auto', got {max_samples!r}"
            )
        super().__init__(
            features, n_estimators=n_estimators, max_samples=max_samples, random_state=random_state
        )
        self.trees: dict[str, np.ndarray] = {}
        self.samples_per_tree = 0

    def fit(self, frame: pd.DataFrame) -> IsolationForestDetector:
        values = self.matrix(frame)
        values = values[np.isfinite(values).all(axis=1)]
        if len(values) < 2:
            raise ValueError("isolation forest needs at least two finite rows to fit")
        # imported here: scikit-learn takes over a second to import, and loading a source's config
        # imports every detector class to check its parameters
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(
            n_estimators=self.params["n_estimators"],
            max_samples=min(self.params["max_samples"], len(values))
            if isinstance(self.params["max_samples"], int)
            else self.params["max_samples"],
            random_state=self.params["random_state"],
        ).fit(values)
        self.samples_per_tree = int(forest.max_samples_)
        self.trees = _flatten(forest)
        return self

    def _walk(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Mean path length per row, and the (n, d) signed credit of each feature. A row with a missing
        value has NaN length and no credit: a NaN would go left at every split, as if it were -inf."""
        if not self.trees:
            raise RuntimeError("fit the detector before scoring")
        # scikit-learn compares float32 inputs against its thresholds; do the same to match it exactly
        values = self.matrix(frame).astype(np.float32).astype(np.float64)
        finite = np.isfinite(values).all(axis=1)
        values[~finite] = 0.0  # walked, then discarded
        left, right, feature, threshold = (self.trees[k] for k in ("left", "right", "feature", "threshold"))
        sizes = self.trees["node_samples"]
        n_rows, n_trees = len(values), len(self.trees["roots"])
        expected_length = average_path_length(np.array([self.samples_per_tree]))[0]
        rows = np.arange(n_rows)
        total_length = np.zeros(n_rows)
        credit = np.zeros((n_rows, len(self.features)))
        for root in self.trees["roots"]:
            node = np.full(n_rows, root)
            depth = np.zeros(n_rows)
            last_feature = np.zeros(n_rows, dtype=np.int64)
            last_sign = np.zeros(n_rows)
            internal = left[node] != LEAF
            while internal.any():
                at = node[internal]
                went_left = ~(values[rows[internal], feature[at]] > threshold[at])
                last_feature[internal] = feature[at]
                last_sign[internal] = np.where(went_left, -1.0, 1.0)
                node[internal] = np.where(went_left, left[at], right[at])
                depth[internal] += 1
                internal = left[node] != LEAF
            length = depth + average_path_length(sizes[node])
            total_length += length
            shortfall = np.maximum(expected_length - length, 0.0)
            np.add.at(credit, (rows, last_feature), last_sign * shortfall)
        return np.where(finite, total_length / n_trees, np.nan), credit / n_trees * finite[:, None]

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        """sklearn's ``-score_samples``; a row with a missing value scores 0 (nothing to compare)."""
        mean_length, _ = self._walk(frame)
        expected_length = average_path_length(np.array([self.samples_per_tree]))[0]
        scores = np.ones(len(frame)) if expected_length == 0 else 2.0 ** (-mean_length / expected_length)
        return np.where(np.isnan(mean_length), 0.0, scores)

    def explain(self, frame: pd.DataFrame) -> np.ndarray:
        return self._walk(frame)[1]

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return dict(self.trees), {"samples_per_tree": self.samples_per_tree}

    @classmethod
    def from_state(
        cls, features: list[str], params: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> IsolationForestDetector:
        detector = cls(features, **params)
        detector.trees = dict(arrays)
        detector.samples_per_tree = int(meta["samples_per_tree"])
        return detector


def _flatten(forest: IsolationForest) -> dict[str, np.ndarray]:
    """All trees of a fitted forest as one node table; feature ids mapped back to the input columns."""
    parts: dict[str, list[np.ndarray]] = {
        "left": [],
        "right": [],
        "feature": [],
        "threshold": [],
        "node_samples": [],
    }
    roots = []
    offset = 0
    for estimator, used_features in zip(forest.estimators_, forest.estimators_features_, strict=True):
        tree = estimator.tree_
        is_leaf = tree.children_left == LEAF
        roots.append(offset)
        parts["left"].append(np.where(is_leaf, LEAF, tree.children_left + offset))
        parts["right"].append(np.where(is_leaf, LEAF, tree.children_right + offset))
        parts["feature"].append(np.where(is_leaf, 0, np.asarray(used_features)[np.maximum(tree.feature, 0)]))
        parts["threshold"].append(tree.threshold.astype(np.float64))
        parts["node_samples"].append(tree.n_node_samples.astype(np.int64))
        offset += tree.node_count
    flat = {key: np.concatenate(value) for key, value in parts.items()}
    flat["roots"] = np.array(roots, dtype=np.int64)
    return flat

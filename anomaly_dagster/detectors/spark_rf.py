"""Supervised random forest: Spark MLlib trains it on labelled buckets, we keep its trees as arrays.

Where labels exist (``labels:`` in the source), the training window's labelled buckets teach a
``VectorAssembler`` + ``RandomForestClassifier`` pipeline what a fault looks like; the score of a bucket
is the forest's probability of the anomaly class, exactly as MLlib computes it (the mean over trees of
each leaf's class share). MLlib writes the fitted forest in its own format (Parquet node tables); we
read those tables into flat arrays, so the saved model is arrays and JSON like every other detector
and scoring needs neither a JVM nor pickle.

A window without both classes (no labels, or no fault in it) cannot teach a classifier: the detector
then scores every bucket 0 and says why in its metadata.

Explanation: along each tree's path, every split that raised the anomaly share credits its feature
with the rise, signed by the side taken (above the threshold = HIGH), averaged over trees.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from anomaly_dagster.detectors.base import Detector

NODE_ARRAYS = ("tree", "feature", "threshold", "left", "right", "anomaly_share")


class SparkRandomForestDetector(Detector):
    """Params: ``num_trees`` (50), ``max_depth`` (5), ``seed`` (0), as in MLlib's RandomForestClassifier."""

    kind: ClassVar[str] = "spark_rf"
    supervised: ClassVar[bool] = True  # modeling.train passes it the training window's labels

    def __init__(self, features: list[str], num_trees: int = 50, max_depth: int = 5, seed: int = 0) -> None:
        super().__init__(features, num_trees=num_trees, max_depth=max_depth, seed=seed)
        self.nodes: dict[str, np.ndarray] | None = None  # flat over trees; children are global indices
        self.roots = np.zeros(0, dtype=np.int64)
        self.meta: dict[str, Any] = {}

    def fit(self, frame: pd.DataFrame, labels: np.ndarray | None = None) -> SparkRandomForestDetector:
        """Train on ``frame``'s rows with ``labels`` (bool per row); both classes are needed."""
        values = self.matrix(frame)
        truth = np.zeros(len(frame), dtype=bool) if labels is None else np.asarray(labels, dtype=bool)
        if truth.shape != (len(frame),):
            raise ValueError(f"spark_rf: {truth.shape[0]} labels for {len(frame)} training rows")
        finite = np.isfinite(values).all(axis=1)
        values, truth = values[finite], truth[finite]
        positives = int(truth.sum())
        self.meta = {"training_rows": len(truth), "positives": positives}
        if positives in (0, len(truth)):
            self.nodes, self.roots = None, np.zeros(0, dtype=np.int64)
            self.meta["untrained"] = "no labels" if labels is None else "the window holds one class only"
            return self
        self.nodes = _train(values, truth, self.params)
        self.roots = np.flatnonzero(np.r_[True, np.diff(self.nodes["tree"]) != 0])
        return self

    def _walk(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly probability per row and the (n, d) signed credit of each feature."""
        values = self.matrix(frame)
        n_rows = len(values)
        credit = np.zeros((n_rows, len(self.features)))
        if self.nodes is None:
            return np.zeros(n_rows), credit
        feature, threshold = self.nodes["feature"], self.nodes["threshold"]
        left, right, share = self.nodes["left"], self.nodes["right"], self.nodes["anomaly_share"]
        rows = np.repeat(np.arange(n_rows), len(self.roots))
        node = np.tile(self.roots, n_rows)
        while (inner := feature[node] >= 0).any():
            at, split = rows[inner], feature[node[inner]]
            value = values[at, split]
            above = ~(value <= threshold[node[inner]])  # MLlib: value <= threshold goes left (NaN right)
            child = np.where(above, right[node[inner]], left[node[inner]])
            rise = np.maximum(share[child] - share[node[inner]], 0.0)
            np.add.at(credit, (at, split), np.where(above, rise, -rise))
            node[inner] = child
        probability = share[node].reshape(n_rows, len(self.roots)).mean(axis=1)
        return probability, credit / len(self.roots)

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        return self._walk(frame)[0]

    def explain(self, frame: pd.DataFrame) -> np.ndarray:
        return self._walk(frame)[1]

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = dict(self.nodes) if self.nodes is not None else {}
        return arrays, self.meta

    @classmethod
    def from_state(
        cls, features: list[str], params: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> SparkRandomForestDetector:
        detector = cls(features, **params)
        detector.meta = meta
        if arrays:
            detector.nodes = {name: arrays[name] for name in NODE_ARRAYS}
            detector.roots = np.flatnonzero(np.r_[True, np.diff(detector.nodes["tree"]) != 0])
        return detector


def _train(values: np.ndarray, truth: np.ndarray, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Fit MLlib's forest on the process's Spark session and read its saved node tables into arrays."""
    from pyspark.ml.classification import RandomForestClassifier
    from pyspark.ml.feature import VectorAssembler

    from anomaly_dagster.engines.spark import spark_session

    spark = spark_session()
    columns = [f"f{index}" for index in range(values.shape[1])]
    rows = pd.DataFrame(values, columns=columns).assign(label=truth.astype(np.float64))
    assembled = VectorAssembler(inputCols=columns, outputCol="features").transform(
        spark.createDataFrame(rows)
    )
    forest = RandomForestClassifier(
        numTrees=int(params["num_trees"]),
        maxDepth=int(params["max_depth"]),
        seed=int(params["seed"]),
        labelCol="label",
        featuresCol="features",
    ).fit(assembled)
    with tempfile.TemporaryDirectory(prefix="anomaly-spark-rf-") as directory:
        forest.write().save(str(Path(directory) / "model"))
        table = pq.read_table(Path(directory) / "model" / "data").to_pandas()
    nodes = pd.json_normalize(table["nodeData"].tolist()).assign(tree=table["treeID"].to_numpy())
    nodes = nodes.sort_values(["tree", "id"], ignore_index=True)
    totals = nodes["impurityStats"].map(lambda counts: float(np.sum(counts)))
    # a tree whose bootstrap sample drew no row (likely with a few training rows) has a root of zero
    # weight: MLlib leaves it out of the probability (it adds no vote), so it is left out here too
    empty = nodes.loc[(nodes["id"] == 0) & (totals == 0), "tree"]
    nodes = nodes[~nodes["tree"].isin(empty)].reset_index(drop=True)
    start = np.arange(len(nodes)) - nodes["id"].to_numpy()  # a tree's node ids run 0..size-1 (preorder)
    stats = np.array([np.asarray(counts, dtype=np.float64) for counts in nodes["impurityStats"]])
    leaf = nodes["leftChild"].to_numpy() < 0
    return {
        "tree": nodes["tree"].to_numpy(np.int64),
        "feature": np.where(leaf, -1, nodes["split.featureIndex"].to_numpy(np.int64)),
        "threshold": np.array([t[0] if len(t) else np.nan for t in nodes["split.leftCategoriesOrThreshold"]]),
        "left": np.where(leaf, -1, start + nodes["leftChild"]).astype(np.int64),
        "right": np.where(leaf, -1, start + nodes["rightChild"]).astype(np.int64),
        "anomaly_share": stats[:, 1] / stats.sum(axis=1),
    }

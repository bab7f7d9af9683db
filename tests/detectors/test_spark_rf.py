"""spark_rf on the reference clickstream: MLlib's own probabilities, saved as arrays, trained on labels.

Features are built from the published 10-minute aggregates and labels; 07-07..07-13 train, 07-14..15
(the program error of the 15th) are scored out of sample. The session-wide local Spark session trains.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
from pyspark.ml.classification import RandomForestClassifier
from pyspark.ml.feature import VectorAssembler

from anomaly_dagster import modeling
from anomaly_dagster.config import PACKAGE_SOURCES_DIR, load_source
from anomaly_dagster.detectors import load_detectors, save_detectors
from anomaly_dagster.detectors.spark_rf import SparkRandomForestDetector
from anomaly_dagster.evaluation import load_labels
from anomaly_dagster.features import build_features

pytestmark = pytest.mark.spark

FEATURES = ["users", "clicks", "residual", "clicks_per_user", "tod_sin", "tod_cos"]
TRAIN = [date(2020, 7, 7) + timedelta(days=offset) for offset in range(7)]
SCORED = [date(2020, 7, 14), date(2020, 7, 15)]


@pytest.fixture(scope="module")
def source():
    return load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml")


@pytest.fixture(scope="module")
def labelled(source, reference_dir) -> tuple[pd.DataFrame, np.ndarray]:
    """Features of every reference day and the label of each bucket."""
    published = pd.read_csv(reference_dir / "clicks_10T.csv", parse_dates=["timestamp"])
    resampled = published.rename(
        columns={"timestamp": "bucket_start", "page": "pages", "user": "users", "click": "clicks"}
    )
    days = TRAIN + SCORED
    features = pd.concat(
        [build_features(source, day, resampled[resampled["bucket_start"].dt.date <= day]) for day in days],
        ignore_index=True,
    )
    labels = load_labels(reference_dir / "fault_label_10T.csv", 10, TRAIN[0])
    return features, labels.reindex(pd.DatetimeIndex(features["bucket_start"]), fill_value=False).to_numpy()


@pytest.fixture(scope="module")
def trained(spark, labelled) -> SparkRandomForestDetector:
    features, truth = labelled
    training = features["bucket_start"].dt.date.isin(TRAIN).to_numpy()
    return SparkRandomForestDetector(FEATURES).fit(features[training], truth[training])


def test_scores_are_mllibs_probabilities(spark, trained, labelled):
    """An MLlib forest fitted alike (same rows, seed, 50 trees) gives the same anomaly probabilities."""
    features, truth = labelled
    training = features["bucket_start"].dt.date.isin(TRAIN).to_numpy()
    rows = features[FEATURES].assign(label=truth.astype(float))
    assembler = VectorAssembler(inputCols=FEATURES, outputCol="features")
    model = RandomForestClassifier(numTrees=50, maxDepth=5, seed=0, labelCol="label").fit(
        assembler.transform(spark.createDataFrame(rows[training].reset_index(drop=True)))
    )
    scored = model.transform(assembler.transform(spark.createDataFrame(rows.reset_index(drop=True))))
    theirs = np.array([row.probability[1] for row in scored.select("probability").collect()])
    assert len(trained.roots) == 50
    np.testing.assert_allclose(trained.score(features), theirs, rtol=1e-12, atol=1e-15)


def test_labelled_faults_score_high_out_of_sample(trained, labelled):
    features, truth = labelled
    scored = features["bucket_start"].dt.date.isin(SCORED).to_numpy()
    scores = trained.score(features[scored])
    faults = truth[scored]
    assert faults.sum() >= 4  # the 07-15 program error and its neighbours
    assert scores[faults].mean() > 0.5 > 0.05 > scores[~faults].mean()
    credit = trained.explain(features[scored])
    # the program error: users fall while clicks stay, so too many clicks per user
    top = np.asarray(FEATURES)[np.abs(credit[faults]).argmax(axis=1)]
    assert set(top) <= {"users", "residual", "clicks_per_user"}


def test_saved_as_arrays_and_json_and_loaded_back(trained, labelled, tmp_path):
    features, _ = labelled
    path = tmp_path / "model.npz"
    save_detectors(path, {"rf": trained}, {})
    with np.load(path, allow_pickle=False) as archive:
        assert {"rf/threshold", "rf/anomaly_share"} <= set(archive.files)
        assert all(archive[key].dtype != object for key in archive.files)
    loaded, document = load_detectors(path)
    assert document["detectors"]["rf"]["params"] == {"num_trees": 50, "max_depth": 5, "seed": 0}
    np.testing.assert_array_equal(loaded["rf"].score(features), trained.score(features))
    np.testing.assert_array_equal(loaded["rf"].explain(features), trained.explain(features))


def test_a_window_without_faults_trains_nothing_and_says_so(labelled, tmp_path):
    features, truth = labelled
    quiet = features.iloc[:50]
    assert not truth[:50].any()
    detector = SparkRandomForestDetector(FEATURES).fit(quiet, truth[:50])
    assert detector.meta["untrained"] == "the window holds one class only"
    assert (detector.score(features) == 0).all()
    save_detectors(tmp_path / "model.npz", {"rf": detector}, {})
    loaded, _ = load_detectors(tmp_path / "model.npz")
    assert (loaded["rf"].score(features) == 0).all()


def test_training_gives_the_detector_the_windows_labels(source, labelled):
    """modeling.train passes the labels to spark_rf (and the pipeline reads them for it)."""
    features, truth = labelled
    config = source.model_dump() | {"ensemble": {"detectors": None, "min_votes": 1}}
    config["detectors"] = [
        {"name": "rf", "kind": "spark_rf", "features": FEATURES, "params": {"num_trees": 5}}
    ]
    with_rf = type(source).model_validate(config)
    assert modeling.needs_labels(with_rf) and not modeling.needs_labels(source)
    training = features["bucket_start"].dt.date.isin(TRAIN).to_numpy()
    labels = pd.Series(True, index=pd.DatetimeIndex(features["bucket_start"][truth]))
    model = modeling.train(with_rf, features[training], TRAIN, False, labels)
    assert model.detectors["rf"].meta["positives"] == int(truth[training].sum()) > 0
    scores = modeling.score(with_rf, features[~training], model.detectors, {"rf": 0.5})
    rf = scores[scores["detector"] == "rf"]
    assert rf["is_anomaly"].any() and set(rf["direction"]) <= {"HIGH", "LOW"}


def test_a_few_training_rows_score_as_mllib_does(spark):
    """With three rows some trees' bootstrap samples are empty: MLlib leaves them out of the
    probability; they made every score NaN."""
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0]})
    truth = np.array([False, False, True])
    detector = SparkRandomForestDetector(["a"]).fit(frame, truth)
    rows = spark.createDataFrame(frame.assign(label=truth.astype(np.float64)))
    assembled = VectorAssembler(inputCols=["a"], outputCol="features").transform(rows)
    forest = RandomForestClassifier(numTrees=50, maxDepth=5, seed=0).fit(assembled)
    expected = [float(p[1]) for p in forest.transform(assembled).toPandas()["probability"]]
    np.testing.assert_allclose(detector.score(frame), expected, rtol=1e-12)

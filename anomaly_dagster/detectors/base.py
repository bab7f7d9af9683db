"""The one interface every detector implements, and its safe (pickle-free) persistence.

A detector is fitted on a window of feature rows and then scores any rows: higher score means
more anomalous. ``explain`` returns a signed per-feature contribution (positive = the value is
higher than expected, negative = lower), which is what incidents report as top feature and
direction. State is a flat dict of NumPy arrays plus a JSON-serialisable dict of parameters,
so a saved model can be opened with nothing but NumPy and ``json``.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from anomaly_dagster.storage import atomic_write_bytes


@dataclass(frozen=True)
class Assessment:
    """What scoring stores for a frame's rows, computed together (a forecast band is forecast once)."""

    scores: np.ndarray  # (n,) see Detector.score
    contributions: np.ndarray  # (n, d) see Detector.explain
    scored: np.ndarray  # (n,) bool, see Detector.scored_rows
    expected: pd.DataFrame | None = None  # (n, d) see Detector.expected
    band: np.ndarray | None = None  # (3, n, d) lower, median and upper value, for band detectors


class Detector(ABC):
    """Base class: subclasses set ``kind`` and implement fit/score/explain and their state."""

    kind: ClassVar[str]
    #: whether a row with only some features missing still gets a real score (per-feature detectors);
    #: otherwise any missing feature gives the row the placeholder score 0
    scores_partial_rows: ClassVar[bool] = False

    def __init__(self, features: list[str], **params: Any) -> None:
        if not features:
            raise ValueError(f"detector {self.kind!r} needs at least one feature")
        self.features = list(features)
        self.params = params

    def matrix(self, frame: pd.DataFrame) -> np.ndarray:
        """The detector's feature columns as a float matrix, with a clear error when one is missing."""
        missing = [name for name in self.features if name not in frame.columns]
        if missing:
            raise KeyError(f"detector {self.kind!r} needs columns {missing}; frame has {list(frame.columns)}")
        return frame[self.features].to_numpy(dtype=np.float64)

    def scored_rows(self, frame: pd.DataFrame) -> np.ndarray:
        """(n,) bool: rows with a measured score. The others hold the placeholder 0 of a missing value,
        which a threshold calibrated on them would take for a normal score (and sit too high)."""
        finite = np.isfinite(self.matrix(frame))
        return finite.any(axis=1) if self.scores_partial_rows else finite.all(axis=1)

    @abstractmethod
    def fit(self, frame: pd.DataFrame) -> Detector:
        """Learn what normal looks like from ``frame``; returns self."""

    @abstractmethod
    def score(self, frame: pd.DataFrame) -> np.ndarray:
        """(n,) anomaly scores, higher is more anomalous; the detector is unchanged."""

    @abstractmethod
    def explain(self, frame: pd.DataFrame) -> np.ndarray:
        """(n, d) signed contribution of each feature: > 0 higher than expected, < 0 lower."""

    def expected(self, frame: pd.DataFrame) -> pd.DataFrame | None:
        """Expected value of each feature per row where the detector has one (else None)."""
        return None

    @property
    def history_rows(self) -> int:
        """How many rows before a frame scoring it reads (a shingled forest's first shingles): 0 here."""
        return 0

    def assess(self, frame: pd.DataFrame, history: pd.DataFrame | None = None) -> Assessment:
        """Score, explanation, measured rows and expected values of ``frame`` in one call; ``history``
        is the :attr:`history_rows` rows before it, for the detectors that read any."""
        return Assessment(
            self.score(frame), self.explain(frame), self.scored_rows(frame), self.expected(frame)
        )

    @abstractmethod
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON-able metadata that fully describe the fitted detector."""

    @classmethod
    @abstractmethod
    def from_state(
        cls, features: list[str], params: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> Detector:
        """Rebuild a fitted detector from what ``state`` returned."""


MODEL_DOCUMENT_KEY = "__model_json__"


def save_detectors(path: Path, detectors: dict[str, Detector], manifest: dict[str, Any]) -> None:
    """Write every detector's arrays and a JSON document into one ``.npz`` file, atomically.

    One file means the model is replaced whole or not at all. Arrays are namespaced
    ``<detector>/<array>``; the JSON document (model-level facts such as the training window and
    thresholds, plus each detector's kind, features, params and meta) is a string array.
    """
    arrays: dict[str, np.ndarray] = {}
    described: dict[str, Any] = {}
    for name, detector in detectors.items():
        detector_arrays, meta = detector.state()
        for key, value in detector_arrays.items():
            arrays[f"{name}/{key}"] = np.asarray(value)
        described[name] = {
            "kind": detector.kind,
            "features": detector.features,
            "params": detector.params,
            "meta": meta,
        }
    document = {**manifest, "detectors": described}
    arrays[MODEL_DOCUMENT_KEY] = np.array(json.dumps(document, sort_keys=True))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_detectors(path: Path) -> tuple[dict[str, Detector], dict[str, Any]]:
    """Inverse of :func:`save_detectors`; never unpickles (``allow_pickle=False``)."""
    from anomaly_dagster.detectors import detector_class

    with np.load(path, allow_pickle=False) as archive:
        stored = {key: archive[key] for key in archive.files}
    document = json.loads(str(stored.pop(MODEL_DOCUMENT_KEY)))
    detectors: dict[str, Detector] = {}
    for name, described in document["detectors"].items():
        prefix = f"{name}/"
        arrays = {key[len(prefix) :]: value for key, value in stored.items() if key.startswith(prefix)}
        cls = detector_class(described["kind"])
        detectors[name] = cls.from_state(
            described["features"], described["params"], arrays, described["meta"]
        )
    return detectors, document

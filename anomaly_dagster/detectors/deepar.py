"""DeepAR forecast band: a probabilistic RNN forecast of the scored day from the days before it.

The profile detectors compare a bucket with the same time of day on earlier days; DeepAR (GluonTS,
torch backend) also reads the recent past, so a slow drift or a shifted day changes what is
expected. One global model is trained on all features (each feature is one series, told apart by a
static category), on the training window's buckets.

How fit/score map onto "train on the days before D, score day D": ``fit`` keeps the training series
as the model's history, and a scored row is forecast from the history that precedes it. Rows after
the training window are one forecast from its end (a missing day in between only lengthens the
horizon); rows inside it are backtests, one ``prediction_length`` window at a time from the data
before that window. The backtests of the training window calibrate the band: its 1% / 99% sample
quantiles cover only ~80% of buckets, so they are widened to ``coverage`` (see ``forecast_band``).

Weights are stored as the module's state dict, one NumPy array per tensor (no pickle, no
``torch.save``), and the network is rebuilt from the params on load. Forecast sampling is seeded
and torch runs on one thread, so the band is a pure function of the saved model and the frame.
torch and GluonTS are imported only when a DeepAR detector is fitted or scored.
"""

from __future__ import annotations

import logging
import random
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from anomaly_dagster.detectors.forecast_band import QUANTILES, BandDetector, day_labels, widen, widen_factors

DEFAULT_FEATURES = ("users", "clicks")
# recent buckets plus the same bucket a day earlier (for 10-minute buckets)
DEFAULT_LAGS = (1, 2, 3, 4, 5, 6, 144)
# library chatter on every fit (deprecations inside GluonTS and Lightning, GPU/TPU banners, the
# temporary checkpoint it writes): none of it is actionable for a pipeline user
QUIET_WARNINGS = (
    "Using a non-tuple sequence for multidimensional indexing",
    "Using `json`-module for json-handling",
    "You defined a `validation_step` but have no `val_dataloader`",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


@contextmanager
def _torch_session(seed: int) -> Iterator[Any]:
    """torch on one thread with every random generator seeded; the caller's state is restored after."""
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        import lightning.pytorch  # noqa: F401  (sets its logger's level on import: import before quieting it)
        import torch

        threads = torch.get_num_threads()
        python_state, numpy_state = random.getstate(), np.random.get_state()
        lightning_logger = logging.getLogger("lightning.pytorch")
        level = lightning_logger.level
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(1)
            torch.manual_seed(seed)
            np.random.seed(seed)  # GluonTS samples training windows from numpy's global generator
            random.seed(seed)
            lightning_logger.setLevel(logging.WARNING)
            try:
                yield torch
            finally:
                lightning_logger.setLevel(level)
                torch.set_num_threads(threads)
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class DeepARDetector(BandDetector):
    """GluonTS DeepAR band. Params: ``context_length``, ``prediction_length`` (buckets), ``epochs``,
    ``num_batches_per_epoch``, ``batch_size``, ``hidden_size``, ``num_layers``, ``lags`` (buckets
    back the RNN reads), ``num_samples`` (sample paths per forecast), ``coverage``, ``seed``.
    ``features`` defaults to users and clicks; the frame needs a ``bucket_start`` column."""

    kind: ClassVar[str] = "deepar"

    def __init__(
        self,
        features: list[str] | None = None,
        context_length: int = 144,
        prediction_length: int = 144,
        epochs: int = 10,
        num_batches_per_epoch: int = 50,
        batch_size: int = 32,
        hidden_size: int = 40,
        num_layers: int = 2,
        lags: list[int] | None = None,
        num_samples: int = 200,
        coverage: float = 0.99,
        seed: int = 0,
    ) -> None:
        if not 0.0 < coverage < 1.0:
            raise ValueError(f"coverage must be between 0 and 1, got {coverage}")
        lags = list(DEFAULT_LAGS if lags is None else lags)
        super().__init__(
            list(DEFAULT_FEATURES) if features is None else features,
            context_length=context_length,
            prediction_length=prediction_length,
            epochs=epochs,
            num_batches_per_epoch=num_batches_per_epoch,
            batch_size=batch_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            lags=lags,
            num_samples=num_samples,
            coverage=coverage,
            seed=seed,
        )
        self.context_length = context_length
        self.prediction_length = prediction_length
        self.lags = lags
        self.coverage = coverage
        self.seed = seed
        self.history: np.ndarray | None = None  # (d, L): the training series on a regular grid, NaN = missing
        self.start: pd.Timestamp | None = None  # bucket of history[:, 0]
        self.step_minutes = 0
        self.min_context = 0  # buckets of observed past every training window and backtest starts from
        self.weights: dict[str, np.ndarray] = {}
        self.factors: np.ndarray | None = None

    # --- time axis ---------------------------------------------------------------------------------------

    @property
    def _freq(self) -> str:
        return f"{self.step_minutes}min"

    def _stamps(self, frame: pd.DataFrame) -> pd.DatetimeIndex:
        if "bucket_start" not in frame.columns:
            raise KeyError(f"detector {self.kind!r} needs the 'bucket_start' column to place rows in time")
        return pd.DatetimeIndex(pd.to_datetime(frame["bucket_start"]))

    def _positions(self, frame: pd.DataFrame) -> np.ndarray:
        """Bucket index of each row on the history's grid (0 = the first training bucket)."""
        offsets = (self._stamps(frame) - self.start) / pd.Timedelta(minutes=self.step_minutes)
        positions = np.asarray(offsets, dtype=np.float64)
        if not np.array_equal(positions, np.round(positions)):
            raise ValueError(f"bucket starts are not on the {self._freq} grid of the training window")
        return positions.astype(np.int64)

    # --- fitting -----------------------------------------------------------------------------------------

    def fit(self, frame: pd.DataFrame) -> DeepARDetector:
        """Train on the window's series, keep them as history, and calibrate the band by backtests."""
        stamps = self._stamps(frame)
        steps = np.diff(stamps.unique().sort_values().asi8)
        if len(steps) == 0:
            raise ValueError(f"detector {self.kind!r} needs a training window of at least two buckets")
        self.start = stamps.min()
        self.step_minutes = int(steps.min() // pd.Timedelta(minutes=1).value)
        positions = self._positions(frame)
        values = self.matrix(frame)
        length = int(positions.max()) + 1
        self.history = np.full((len(self.features), length), np.nan)
        self.history[:, positions] = values.T
        # a short window still trains: on forecasts of its second half from its first
        self.min_context = min(self.context_length, length // 2)
        horizon = min(self.prediction_length, length - self.min_context)
        self.weights = self._train(horizon)
        self.factors = widen_factors(values, self._raw_bounds(positions), self.coverage, day_labels(frame))
        return self

    def _estimator(self, prediction_length: int, **options: Any) -> Any:
        from gluonts.time_feature import hour_of_day, minute_of_hour
        from gluonts.torch.model.deepar import DeepAREstimator

        params = self.params
        return DeepAREstimator(
            freq=self._freq,
            prediction_length=prediction_length,
            context_length=self.context_length,
            num_layers=params["num_layers"],
            hidden_size=params["hidden_size"],
            lags_seq=self.lags,
            time_features=[minute_of_hour, hour_of_day],  # a few days hold no weekly or yearly cycle
            num_feat_static_cat=1,
            cardinality=[len(self.features)],
            num_parallel_samples=params["num_samples"],
            batch_size=params["batch_size"],
            num_batches_per_epoch=params["num_batches_per_epoch"],
            **options,
        )

    def _dataset(self, end: int) -> Any:
        from gluonts.dataset.common import ListDataset

        start = pd.Period(self.start, freq=self._freq)
        return ListDataset(
            [
                {"start": start, "target": series[:end], "feat_static_cat": [index]}
                for index, series in enumerate(self.history)
            ],
            freq=self._freq,
        )

    def _train(self, horizon: int) -> dict[str, np.ndarray]:
        with _torch_session(self.seed), tempfile.TemporaryDirectory() as scratch:
            from gluonts.transform import ExpectedNumInstanceSampler

            estimator = self._estimator(
                horizon,
                train_sampler=ExpectedNumInstanceSampler(
                    num_instances=1.0, min_past=self.min_context, min_future=horizon
                ),
                trainer_kwargs={
                    "max_epochs": self.params["epochs"],
                    "accelerator": "cpu",
                    "devices": 1,
                    "logger": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "default_root_dir": scratch,  # GluonTS always checkpoints; keep it out of the cwd
                },
            )
            trained = estimator.train_model(self._dataset(self.history.shape[1])).trained_net
            return {name: tensor.detach().cpu().numpy() for name, tensor in trained.state_dict().items()}

    # --- forecasting -------------------------------------------------------------------------------------

    def _forecast(self, end: int, horizon: int) -> np.ndarray:
        """(3, horizon, d) sample quantiles of the ``horizon`` buckets after history[:, :end]."""
        with _torch_session(self.seed) as torch:
            estimator = self._estimator(horizon)
            module = estimator.create_lightning_module()
            module.load_state_dict(
                {name: torch.from_numpy(np.array(value)) for name, value in self.weights.items()}
            )
            predictor = estimator.create_predictor(estimator.create_transformation(), module)
            forecasts = list(predictor.predict(self._dataset(end)))
        samples = np.stack([forecast.samples for forecast in forecasts], axis=-1)  # (samples, horizon, d)
        lower, median, upper = np.quantile(samples, QUANTILES, axis=0)
        floor = 1e-6 * np.maximum(np.abs(median), 1.0)  # a degenerate sample spread must not divide by zero
        return np.stack([np.minimum(lower, median - floor), median, np.maximum(upper, median + floor)])

    def _raw_bounds(self, positions: np.ndarray) -> np.ndarray:
        """(3, n, d) uncalibrated band of the rows at ``positions``; NaN where there is no past to start from."""
        if self.history is None:
            raise RuntimeError("fit the detector before scoring")
        length = self.history.shape[1]
        bounds = np.full((3, len(positions), len(self.features)), np.nan)
        window = (positions - length) // self.prediction_length
        starts = np.where(
            window >= 0, length, np.maximum(length + window * self.prediction_length, self.min_context)
        )
        for start in np.unique(starts[positions >= self.min_context]):
            rows = (starts == start) & (positions >= start)
            forecast = self._forecast(int(start), int(positions[rows].max() - start + 1))
            # a forecast whose context holds no observation of a feature (it starts after a missing day)
            # is a degenerate band around nothing: that feature has no band there, as before min_context
            context = self.history[:, max(0, int(start) - self.context_length) : int(start)]
            forecast[:, :, ~np.isfinite(context).any(axis=1)] = np.nan
            bounds[:, rows] = forecast[:, positions[rows] - start]
        return bounds

    def bounds(self, frame: pd.DataFrame) -> np.ndarray:
        if self.factors is None:
            raise RuntimeError("fit the detector before scoring")
        return widen(self._raw_bounds(self._positions(frame)), self.factors)

    # --- persistence -------------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"history": self.history, "factors": self.factors}
        arrays.update({f"weights/{name}": value for name, value in self.weights.items()})
        meta = {
            "start": self.start.isoformat(),
            "step_minutes": self.step_minutes,
            "min_context": self.min_context,
            "weights": sorted(self.weights),
            "versions": {package: version(package) for package in ("gluonts", "torch")},
        }
        return arrays, meta

    @classmethod
    def from_state(
        cls, features: list[str], params: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> DeepARDetector:
        detector = cls(features, **params)
        detector.history = arrays["history"]
        detector.factors = arrays["factors"]
        detector.weights = {name: arrays[f"weights/{name}"] for name in meta["weights"]}
        detector.start = pd.Timestamp(meta["start"])
        detector.step_minutes = meta["step_minutes"]
        detector.min_context = meta["min_context"]
        return detector

"""Many series in one source: the entity column (``entity: sensor_id``) and per-entity work.

A source with an entity column holds one series per entity value: every per-bucket table carries
the column, each entity gets its own bucket grid, lags, detectors and thresholds, and incidents
never span two entities. The single-series functions (features, scoring, flagging, incidents) stay
as they are; :func:`per_entity` runs them once per entity and puts the column back. Without an
entity column it runs them once on the whole frame, unchanged.

Models are trained per entity rather than as one model with per-entity normalisation: sensors of
one fleet sit in different places (a cold room, an engine bay) with their own level, daily cycle
and noise, and a person reading an alert expects "unusual for this sensor", with a threshold
calibrated on that sensor's own history. A new entity is cold-started on its first day, as a new
source is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_dagster.config import SourceConfig
from anomaly_dagster.detectors import Detector, load_detectors, save_detectors
from anomaly_dagster.modeling import ENSEMBLE
from anomaly_dagster.sql import quote_identifier, quote_literal

# the series of rows whose (optional) entity column is missing or blank
MISSING_ENTITY = "default"


def entity_sql(source: SourceConfig) -> str:
    """SQL for a raw event's entity: the column's value, or :data:`MISSING_ENTITY` when it has none."""
    column = quote_identifier(source.entity, "entity column")
    return f"coalesce(nullif(trim({column}), ''), {quote_literal(MISSING_ENTITY)})"


def split(
    source: SourceConfig, frame: pd.DataFrame, entities: list[str] | None = None
) -> Iterator[tuple[str | None, pd.DataFrame]]:
    """(entity, its rows without the entity column) in entity order; (None, frame) without entities.

    ``entities`` restricts and orders the entities (one with no rows gets an empty frame).
    """
    if source.entity is None:
        yield None, frame
        return
    if source.entity not in frame.columns:
        if frame.empty and not len(frame.columns):  # a day without any entity reads as no columns
            return
        raise KeyError(
            f"{source.name}: entity column {source.entity!r} missing; frame has {list(frame.columns)}"
        )
    groups = {str(key): part for key, part in frame.groupby(source.entity, sort=True)}
    for entity in sorted(groups) if entities is None else entities:
        part = groups.get(entity, frame.iloc[:0])
        yield entity, part.drop(columns=source.entity).reset_index(drop=True)


def with_entity(source: SourceConfig, frame: pd.DataFrame, entity: str | None) -> pd.DataFrame:
    """``frame`` with the entity column inserted after ``bucket_start`` (or first); as is without entities."""
    if source.entity is None or entity is None:
        return frame
    result = frame.copy()
    position = 1 if "bucket_start" in result.columns else 0
    result.insert(
        position, source.entity, pd.Series([entity] * len(result), index=result.index, dtype=object)
    )
    return result


def per_entity(
    source: SourceConfig,
    frame: pd.DataFrame,
    apply: Callable[[str | None, pd.DataFrame], pd.DataFrame],
    entities: list[str] | None = None,
) -> pd.DataFrame:
    """``apply(entity, rows)`` per entity, concatenated with the entity column; ``apply(None, frame)``
    without entities. With no entity at all: no rows, only the entity column (a partition of a day
    when nothing reported, which the catalog's views still read)."""
    parts = [
        with_entity(source, apply(entity, rows), entity) for entity, rows in split(source, frame, entities)
    ]
    if not parts:
        return pd.DataFrame({source.entity: pd.Series(dtype=object)})
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def entities_on(source: SourceConfig, frame: pd.DataFrame, day: date | None = None) -> list[str]:
    """The entities with rows in ``frame`` (on ``day`` when given), sorted."""
    if source.entity is None or frame.empty or source.entity not in frame.columns:
        return []
    if day is not None:
        frame = frame[pd.DatetimeIndex(frame["bucket_start"]).date == day]
    return sorted(str(value) for value in frame[source.entity].unique())


# --- per-entity models in one file -----------------------------------------------------------------


def save_entity_models(path: Path, models: dict[str, tuple[dict[str, Detector], dict[str, object]]]) -> None:
    """Every entity's detectors in one ``.npz`` (replaced whole), namespaced ``<index>.<detector>``.

    ``models`` maps entity → (detectors, manifest). Entity values come from the data and may hold
    any character, so arrays are keyed by the entity's position; the JSON document lists the
    entities in that order with their manifests (training window, cold start, thresholds).
    """
    detectors: dict[str, Detector] = {}
    listed = []
    for index, (entity, (entity_detectors, manifest)) in enumerate(sorted(models.items())):
        detectors.update({f"{index}.{name}": detector for name, detector in entity_detectors.items()})
        listed.append({"entity": entity, **manifest})
    save_detectors(path, detectors, {"entities": listed})


def load_entity_models(path: Path) -> dict[str, tuple[dict[str, Detector], dict[str, float]]]:
    """Inverse of :func:`save_entity_models`: entity → (detectors, threshold values); no pickle."""
    detectors, document = load_detectors(path)
    models = {}
    for index, manifest in enumerate(document["entities"]):
        prefix = f"{index}."
        own = {name[len(prefix) :]: d for name, d in detectors.items() if name.startswith(prefix)}
        thresholds = {name: float(spec["value"]) for name, spec in manifest["thresholds"].items()}
        models[manifest["entity"]] = (own, thresholds)
    return models


def busiest_entity(source: SourceConfig, scores: pd.DataFrame) -> str | None:
    """The entity a plot shows: most flagged ensemble buckets, then the highest ensemble score."""
    if source.entity is None or scores.empty:
        return None
    ensemble = scores[scores["detector"] == ENSEMBLE]
    ranking = ensemble.groupby(source.entity).agg(
        flagged=("is_anomaly", "sum"), peak=("normalized", lambda values: np.nanmax(values, initial=-np.inf))
    )
    return str(ranking.sort_values(["flagged", "peak"], ascending=False).index[0])

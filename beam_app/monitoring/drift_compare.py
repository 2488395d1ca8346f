"""Served features against a model's training statistics: the served log
streamed once into per-feature accumulators, and drift.json's document
(Jensen-Shannon divergence for numbers, L-infinity for strings, missing and
empty-window shares, out-of-vocabulary values). No I/O beyond reading the
statistics; `python -m beam_app.drift` is the command around it."""

from __future__ import annotations

import collections
import json
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Optional

import numpy as np

from beam_app.bigquery.tables import served_columns
from beam_app.monitoring import drift_measures as measures
from transforms.events import rfc3339_to_time_us, time_us_to_rfc3339
from transforms.spec import FeatureSpec, load_spec, presence_name, spec_from_dict

JSD = "jensen_shannon_divergence"
L_INFINITY = "l_infinity_distance"
TRAIN_SPLIT = "train"
PLOTTED_VALUES = 20  # string features: the values shown in drift.json's distribution and the report
_FLUSH_EVERY = 8192  # numeric values binned at once (numpy), the most held per feature


class DriftInputError(ValueError):
    """Inputs that cannot be compared: the message says which and why."""


class ServedFeature(NamedTuple):
    """A served column compared with training, and how its row says it is missing."""

    name: str
    role: str  # "static" | "windowed"
    type: str  # "numeric" | "string"
    flag: Optional[str]  # the `<name>_present` column, if it has one
    is_count: bool  # a windowed count: never missing, an empty window is 0


def served_features(spec: FeatureSpec) -> tuple[ServedFeature, ...]:
    """The features of the served-features log (beam_app.bigquery.tables.served_columns),
    without their presence flags, which become how each says it is missing."""
    columns = served_columns(spec)
    flags = {column.name for column in columns if column.role in ("presence", "static_presence")}
    features = []
    for column in columns:
        if column.role not in ("static", "windowed"):
            continue
        flag = presence_name(column.name) if presence_name(column.name) in flags else None
        features.append(ServedFeature(column.name, column.role, "string" if column.dtype == "bytes" else "numeric",
                                      flag, column.role == "windowed" and flag is None))
    return tuple(features)


def served_value(feature: ServedFeature, row: Mapping[str, Any]) -> Any:
    """The value the model received, or None when it was missing: an optional
    number or a windowed aggregate with its flag 0 (its 0 is no value), NULL."""
    if feature.flag is not None and not row.get(feature.flag):
        return None
    return row.get(feature.name)


class NumericAccumulator:
    """Served values of one numeric feature -> counts on training's edges (plus
    under- and overflow), zeros, sum, min, max: memory bounded by _FLUSH_EVERY."""

    def __init__(self, edges: Optional[list[float]]):
        self.edges = edges
        self.counts = np.zeros(len(edges) + 1, dtype=np.int64) if edges else None
        self.present = self.missing = self.zeros = 0
        self.total = 0.0
        self.min = self.max = None
        self._buffer: list[float] = []

    def add(self, value: Any) -> None:
        if value is None:
            self.missing += 1
            return
        self._buffer.append(float(value))
        if len(self._buffer) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        values = np.asarray(self._buffer, dtype=float)
        self._buffer = []
        if self.counts is not None:
            self.counts += measures.bin_on_edges(values, self.edges)
        self.present += values.size
        self.zeros += int((values == 0).sum())
        self.total += float(values.sum())
        low, high = float(values.min()), float(values.max())
        self.min = low if self.min is None else min(self.min, low)
        self.max = high if self.max is None else max(self.max, high)


class StringAccumulator:
    """Served values of one string feature -> value counts (memory grows with the
    distinct values, not the rows) and missing."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.missing = 0

    def add(self, value: Any) -> None:
        if value is None:
            self.missing += 1
        else:
            self.counts[str(value)] += 1

    def flush(self) -> None:
        pass

    @property
    def present(self) -> int:
        return sum(self.counts.values())


class ServedLog:
    """Everything the drift report needs from the served rows, accumulated one row at a time."""

    def __init__(self, features: Iterable[ServedFeature], training: Mapping[str, Mapping], fingerprint: str):
        self.features = tuple(features)
        self.fingerprint = fingerprint
        self.accumulators = {
            f.name: (NumericAccumulator((training.get(f.name, {}).get("histogram") or {}).get("edges"))
                     if f.type == "numeric" else StringAccumulator())
            for f in self.features}
        self.rows_read = self.rows_compared = 0
        self.model_versions: collections.Counter = collections.Counter()
        self.other_fingerprints: collections.Counter = collections.Counter()
        self.first_us: Optional[int] = None
        self.last_us: Optional[int] = None

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows_read += 1
        if row.get("spec_fingerprint") != self.fingerprint:
            self.other_fingerprints[str(row.get("spec_fingerprint"))] += 1
            return
        self.rows_compared += 1
        self.model_versions[str(row.get("model_version"))] += 1
        time_us = rfc3339_to_time_us(row["event_time"])
        self.first_us = time_us if self.first_us is None else min(self.first_us, time_us)
        self.last_us = time_us if self.last_us is None else max(self.last_us, time_us)
        for feature in self.features:
            self.accumulators[feature.name].add(served_value(feature, row))

    def finish(self) -> None:
        for accumulator in self.accumulators.values():
            accumulator.flush()


def _missing_share(stats: Mapping[str, Any]) -> Optional[float]:
    if stats.get("missing_share") is not None:
        return float(stats["missing_share"])
    return measures.share(stats.get("missing", 0), stats.get("count", 0) + stats.get("missing", 0))


def _top_shares(training: Mapping[str, int], served: Mapping[str, int], limit: int) -> dict[str, dict[str, float]]:
    """The `limit` values with the largest share on either side (and one OTHER for the rest), as shares."""
    t_total, s_total = sum(training.values()), sum(served.values())
    t_share = {v: c / t_total for v, c in training.items()} if t_total else {}
    s_share = {v: c / s_total for v, c in served.items()} if s_total else {}
    ranked = sorted((set(t_share) | set(s_share)) - {measures.OTHER},
                    key=lambda v: (-max(t_share.get(v, 0), s_share.get(v, 0)), v))
    shown = ranked[:limit]
    result = {"training": {v: t_share.get(v, 0.0) for v in shown}, "served": {v: s_share.get(v, 0.0) for v in shown}}
    for side, shares in (("training", t_share), ("served", s_share)):
        rest = 1.0 - sum(result[side].values()) if shares else 0.0
        if rest > 1e-12:
            result[side][measures.OTHER] = rest
    if measures.OTHER in result["training"] or measures.OTHER in result["served"]:
        for side in ("training", "served"):
            result[side].setdefault(measures.OTHER, 0.0)
    return result


def compare_feature(feature: ServedFeature, training: Optional[Mapping[str, Any]], served) -> dict[str, Any]:
    """One feature's drift: training's stats.json entry vs the served accumulator ->
    its drift.json entry (the measure, counts, missing, empty-window and OOV shares,
    and the distributions the report plots). `value` is None, with a `note`, when
    one side has no values to compare."""
    measure = JSD if feature.type == "numeric" else L_INFINITY
    entry: dict[str, Any] = {"role": feature.role, "type": feature.type, "measure": measure, "value": None,
                             "note": None}
    served_total = served.present + served.missing
    entry["served_count"] = served.present
    entry["served_missing_share"] = measures.share(served.missing, served_total)
    if training is None:
        entry.update(training_count=None, training_missing_share=None, training_empty_window_share=None,
                     served_empty_window_share=None, empty_window_share_difference=None,
                     oov_share=None, oov_share_known=False, note="not in the training statistics")
        return entry
    if training.get("type") != feature.type:
        raise DriftInputError(f"feature {feature.name}: the statistics say {training.get('type')}, "
                              f"the spec serves it as {feature.type}")
    entry["training_count"] = int(training.get("count", 0))
    entry["training_missing_share"] = _missing_share(training)

    training_empty = served_empty = None
    if feature.role == "windowed":
        if feature.is_count:  # an empty window is a count of 0
            training_empty = training.get("zero_share")
            served_empty = measures.share(served.zeros, served.present)
        else:
            training_empty, served_empty = entry["training_missing_share"], entry["served_missing_share"]
    entry["training_empty_window_share"] = training_empty
    entry["served_empty_window_share"] = served_empty
    entry["empty_window_share_difference"] = (None if training_empty is None or served_empty is None
                                              else served_empty - training_empty)

    if feature.type == "numeric":
        entry.update(oov_share=None, oov_share_known=False)
        _compare_numeric(entry, training, served)
    else:
        _compare_strings(entry, training, served)
    return entry


def _compare_numeric(entry: dict[str, Any], training: Mapping[str, Any], served: NumericAccumulator) -> None:
    histogram = training.get("histogram") or {}
    edges, counts = histogram.get("edges"), histogram.get("counts")
    entry["served_mean"] = served.total / served.present if served.present else None
    entry["served_min"], entry["served_max"] = served.min, served.max
    entry["training_mean"], entry["training_min"], entry["training_max"] = (
        training.get("mean"), training.get("min"), training.get("max"))
    if not edges or counts is None or len(counts) != len(edges) - 1:
        entry["note"] = "training has no histogram (no values?)"
        return
    training_counts = measures.with_tails(counts)
    entry["distribution"] = {"edges": [float(e) for e in edges], "training": training_counts.tolist(),
                             "served": served.counts.tolist()}
    entry["served_outside_training_range"] = int(served.counts[0] + served.counts[-1])
    if served.present == 0:
        entry["note"] = "no served values"
    elif training_counts.sum() == 0:
        entry["note"] = "no training values"
    else:
        entry["value"] = measures.jensen_shannon_divergence(training_counts, served.counts)


def _compare_strings(entry: dict[str, Any], training: Mapping[str, Any], served: StringAccumulator) -> None:
    training_counts, complete = measures.training_value_counts(
        int(training.get("count", 0)), training.get("top") or [], training.get("values"),
        bool(training.get("values_complete")))
    served_counts = dict(served.counts)
    entry["training_distinct"] = training.get("distinct")
    entry["served_distinct"] = len(served_counts)
    entry["oov_share_known"] = complete
    entry["oov_share"] = measures.oov_share(served_counts, training_counts) if complete else None
    compared = served_counts if complete else measures.lump_into(served_counts, training_counts)
    entry["distribution"] = _top_shares(training_counts, compared, PLOTTED_VALUES)
    if not complete:
        entry["note"] = (f"training lists its top {len(training_counts) - (measures.OTHER in training_counts)} "
                         "values only: the distance is over those and one bucket for all others; OOV share unknown")
    if not served_counts:
        entry["note"] = "no served values"
    elif not training_counts:
        entry["note"] = "no training values"
    else:
        entry["value"] = measures.l_infinity_distance(training_counts, compared)


class StatsSource(NamedTuple):
    stats_path: str
    spec_path: Optional[str]  # the spec.json beside the statistics, when there is one
    model_version: Optional[str]  # when found through --model


def read_text(path: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as raw:
        return raw.read().decode("utf-8")


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def locate_stats(model: Optional[str], stats: Optional[str]) -> StatsSource:
    """--model (a model directory with LATEST, a version or a saved_model directory:
    models.inference.locate_model) or --stats -> where the statistics and their spec are."""
    if stats is not None:
        beside = posixpath.join(posixpath.dirname(stats) or ".", "spec.json")
        return StatsSource(stats, beside if _exists(beside) else None, None)
    from models.inference import locate_model

    location = locate_model(model)
    extra = posixpath.join(location.saved_model, "assets.extra")
    path = posixpath.join(extra, "stats.json")
    if not _exists(path):
        raise DriftInputError(f"model version {location.version} has no training statistics ({path}): it was "
                              "exported before stats.json existed; give --stats")
    spec = posixpath.join(extra, "spec.json")
    return StatsSource(path, spec if _exists(spec) else None, location.version)


def load_stats(text: str, where: str) -> dict[str, Any]:
    """stats.json -> the document, checked for what the comparison reads."""
    try:
        document = json.loads(text)
        if not isinstance(document["spec"]["fingerprint"], str) or not isinstance(
                document["splits"][TRAIN_SPLIT]["features"], dict):
            raise TypeError("spec.fingerprint must be a string and the features a mapping")
    except (ValueError, KeyError, TypeError) as err:
        raise DriftInputError(f"{where}: not a training statistics file (expected spec.fingerprint and "
                              f"splits.{TRAIN_SPLIT}.features): {err!r}") from None
    return document


def resolve_spec(spec_arg: Optional[str], source: StatsSource, fingerprint: str) -> FeatureSpec:
    """--spec, else the spec.json beside the statistics; it must be the statistics' spec."""
    if spec_arg is not None:
        spec = load_spec(spec_arg)
    elif source.spec_path is not None:
        document = json.loads(read_text(source.spec_path))
        spec = spec_from_dict(document["spec"] if "spec" in document else document)
    else:
        raise DriftInputError(f"no spec.json beside {source.stats_path}: give --spec (a shipped spec name or a file)")
    if spec.fingerprint != fingerprint:
        raise DriftInputError(f"the statistics were computed with spec {fingerprint[:12]}, the spec given is "
                              f"{spec.name} {spec.fingerprint[:12]}: compare a model with its own spec")
    return spec


def summarize(document: dict[str, Any], threshold: Optional[float]) -> None:
    """Fills in the overall maximum and the verdict."""
    scored = {name: f for name, f in document["features"].items() if f["value"] is not None}
    if scored:
        name = max(scored, key=lambda n: (scored[n]["value"], n))
        document["max"] = {"feature": name, "measure": scored[name]["measure"], "value": scored[name]["value"]}
    else:
        document["max"] = {"feature": None, "measure": None, "value": None}
    above = sorted(n for n, f in scored.items() if threshold is not None and f["value"] > threshold)
    document["threshold"] = threshold
    document["features_above_threshold"] = above
    if threshold is None:
        document["passed"] = None
    else:
        document["passed"] = not above and document["served"]["rows_compared"] > 0


def _rfc3339(time_us: Optional[int]) -> Optional[str]:
    return None if time_us is None else time_us_to_rfc3339(time_us)


def drift_document(stats: Mapping[str, Any], source: StatsSource, served_source: str, start: Optional[str],
                   end: Optional[str], log: ServedLog, skipped: Mapping[str, str],
                   threshold: Optional[float], generated_at: str) -> dict[str, Any]:
    """The whole drift.json: the inputs, the served rows' counts, each feature's comparison, the verdict."""
    training = stats["splits"][TRAIN_SPLIT]["features"]
    features = {f.name: compare_feature(f, training.get(f.name), log.accumulators[f.name]) for f in log.features}
    document = {
        "generated_at": generated_at,
        "training": {"stats": source.stats_path, "model_version": source.model_version, "split": TRAIN_SPLIT,
                     "examples": stats["splits"][TRAIN_SPLIT].get("examples")},
        "spec": {"name": stats["spec"].get("name"), "fingerprint": stats["spec"]["fingerprint"]},
        "served": {"source": served_source, "start": start, "end": end,
                   "first_event_time": _rfc3339(log.first_us), "last_event_time": _rfc3339(log.last_us),
                   "rows_read": log.rows_read, "rows_compared": log.rows_compared,
                   "rows_other_spec": log.rows_read - log.rows_compared,
                   "other_spec_fingerprints": dict(log.other_fingerprints),
                   "model_versions": dict(sorted(log.model_versions.items()))},
        "features": features,
        "skipped": dict(skipped),
    }
    summarize(document, threshold)
    return document

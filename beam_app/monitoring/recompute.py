"""The consistency job's steps, under the command (beam_app/consistency.py):
history rows to events, the batch engine's recomputation of the served requests,
the join and the verdicts (verdicts.py, pure), the explanation of every
difference (transforms/skew.py), and the consistency.json body."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import apache_beam as beam

from beam_app.bigquery.tables import event_fields, served_columns
from beam_app.monitoring.verdicts import difference_record, judge, must_be_logged
from transforms import counters
from transforms.deduplicate import DeduplicateEvents
from transforms.events import Event, InvalidRecord, rfc3339_to_time_us
from transforms.examples import row_values
from transforms.feature_layout import EventLayout, event_key, feature_groups
from transforms.parse import EventValidator
from transforms.skew import Arrived, column_groups, explain_group
from transforms.spec import FeatureSpec
from transforms.windowed_features import WindowedFeatures

DIFFERENCES = "differences"
REFUSED = "refused"
COUNTS, RECORDS = "counts", "records"
SAMPLE_UNEXPLAINED = 100  # listed in consistency.json; differences-*.ndjson has them all


def arrived_from_row(row: dict, names: tuple[str, ...], validate: Callable[[Event], Event]) -> Arrived:
    """An events archive row -> Arrived(the validated Event, when the job received it).
    Raises InvalidRecord (or KeyError for a missing column) when the spec refuses the row."""
    fields = {name: row.get(name) for name in names if row.get(name) is not None}
    event = validate(Event(row["event_id"], row["role"], rfc3339_to_time_us(row["event_time"]), fields))
    return Arrived(event, rfc3339_to_time_us(row["processing_time"]))


class EventsFromTable(beam.DoFn):
    """Events archive rows -> Arrived(validated Event, arrival): a row the spec refuses is counted and left out."""

    def __init__(self, spec: FeatureSpec):
        self._spec = spec
        self._names = tuple(event_fields(spec))

    def setup(self):
        self._validate = EventValidator(self._spec)

    def process(self, row: dict):
        try:
            yield arrived_from_row(row, self._names, self._validate)
        except (InvalidRecord, KeyError) as err:
            logging.warning("history row %s refused: %s", row.get("event_id"), err)
            yield beam.pvalue.TaggedOutput(REFUSED, (counters.HISTORY_REFUSED.key, 1))


class _TimeBounds(beam.CombineFn):
    """The earliest and latest served event time: the range an open --start/--end means."""

    def create_accumulator(self):
        return None

    def add_input(self, bounds, time_us):
        return (time_us, time_us) if bounds is None else (min(bounds[0], time_us), max(bounds[1], time_us))

    def merge_accumulators(self, accumulators):
        present = [b for b in accumulators if b is not None]
        return (min(b[0] for b in present), max(b[1] for b in present)) if present else None

    def extract_output(self, bounds):
        return bounds


class _Compare(beam.DoFn):
    """(event_id, {"served": [rows], "batch": [FeatureRow]}) -> (counter key, n)
    (main) and, per served row that differs, (difference id, difference) (tagged).
    The verdicts are beam_app/monitoring/verdicts.py's."""

    def __init__(self, spec: FeatureSpec, start_us: Optional[int], end_us: Optional[int], fraction: float):
        self._spec = spec
        self._range = (start_us, end_us)
        self._fraction = fraction
        self._columns = tuple(column.name for column in served_columns(spec))

    def process(self, joined, logged):
        event_id, sides = joined
        served, recomputed = list(sides["served"]), list(sides["batch"])
        request = recomputed[0].event if recomputed else None
        expected_in_log = not served and request is not None and must_be_logged(
            event_id, request.time_us, *self._range, logged, self._fraction)
        verdicts = judge(served, row_values(self._spec, recomputed[0]) if recomputed else None, self._columns,
                         self._spec.fingerprint, expected_in_log)
        yield from verdicts.counts.items()
        for difference in verdicts.differences:
            yield beam.pvalue.TaggedOutput(DIFFERENCES, (f"{event_id}#{difference.index}",
                                                         difference_record(event_id, request, difference)))


def _difference_keys(spec: FeatureSpec):
    """A difference -> ((key field, key value), (difference id, group index)) per differing feature group."""
    owner = column_groups(spec)
    groups = feature_groups(spec)
    layout = EventLayout.of(spec)

    def keys(keyed):
        difference_id, difference = keyed
        touched = {groups.index(owner[name]) for name in difference["columns"] if owner.get(name) is not None}
        for index in sorted(touched):
            group = groups[index]
            yield (group.name, event_key(layout, group, difference["request"])), (difference_id, index, difference)
    return keys


class _Explain(beam.DoFn):
    """((group name, key value), {"differences": [...], "observations": [Arrived]}) -> (difference id, (group, explanation))."""

    def __init__(self, spec: FeatureSpec):
        self._spec = spec

    def process(self, joined):
        _, sides = joined
        observations = list(sides["observations"])
        groups = feature_groups(self._spec)
        for difference_id, index, difference in sides["differences"]:
            explanation = explain_group(self._spec, groups[index], difference["request"], difference["served"],
                                        observations, rfc3339_to_time_us(difference["job_start_time"]))
            yield difference_id, (groups[index].name, explanation)


def _finish_difference(spec: FeatureSpec):
    owner = column_groups(spec)

    def finish(joined):
        difference_id, sides = joined
        (difference,) = sides["difference"]
        explained = dict(sides["explanations"])
        static = [name for name in difference["columns"] if owner.get(name) is None]
        groups = {owner[name].name for name in difference["columns"] if owner.get(name) is not None}
        explanations = {field: explained.get(field) for field in sorted(groups)}
        complete = not static and all(explanations.values())
        categories = sorted({part for e in explanations.values() if e for part in e.category.split("+")})
        return {
            "event_id": difference["event_id"], "event_time": difference["event_time"],
            "model_version": difference["model_version"], "processing_time": difference["processing_time"],
            "job_start_time": difference["job_start_time"], "source": difference["served"].get("source"),
            "columns": difference["columns"], "explained": complete, "categories": categories if complete else categories + ["unexplained"],
            "explanations": {field: (e.detail if e else None) for field, e in explanations.items()},
            **({"unexplained_static_columns": static} if static else {}),
        }
    return finish


def _difference_counters(record: dict):
    """A finished difference -> (counter key, 1): explained (and by what), or unexplained."""
    if record["explained"]:
        yield counters.DIFFERENCES_EXPLAINED.key, 1
        for category in record["categories"]:
            yield counters.explained_by(category).key, 1
    else:
        yield counters.DIFFERENCES_UNEXPLAINED.key, 1


def summarize(counts: dict[str, int], unexplained: list[dict], spec: FeatureSpec, settings: dict) -> dict:
    """The consistency.json body from the counter keys' totals (transforms/counters.py);
    `settings`: the job's flags, echoed (max_mismatch_fraction decides "passed")."""
    c = lambda counter: counter.of(counts)  # noqa: E731
    columns = {name: {verdict: c(counters.column_verdict(name, verdict)) for verdict in counters.COLUMN_VERDICTS}
               for name in (column.name for column in served_columns(spec))}
    equal, different = c(counters.REQUESTS_EQUAL), c(counters.REQUESTS_DIFFERENT)
    compared = equal + different
    mismatch = different / compared if compared else 0.0
    explained, unexplained_count = c(counters.DIFFERENCES_EXPLAINED), c(counters.DIFFERENCES_UNEXPLAINED)
    return {
        "spec": {"name": spec.name, "fingerprint": spec.fingerprint},
        **settings,
        "history_records_refused": c(counters.HISTORY_REFUSED),
        "rows_logged": c(counters.ROWS_LOGGED),
        "requests_logged": c(counters.REQUESTS_LOGGED),
        "requests_logged_more_than_once": c(counters.REQUESTS_LOGGED_MORE_THAN_ONCE),
        "rows_spec_mismatch": c(counters.ROWS_SPEC_MISMATCH),
        "requests_compared": compared,
        "requests_equal": equal,
        "requests_different": different,
        "rows_logged_not_recomputable": c(counters.ROWS_LOGGED_NOT_RECOMPUTABLE),
        "requests_recomputable_not_logged": c(counters.REQUESTS_RECOMPUTABLE_NOT_LOGGED),
        "differences": explained + unexplained_count,
        "differences_explained": explained,
        "differences_unexplained": unexplained_count,
        "explained_by": dict(sorted(counters.explained_by_category(counts).items())),
        "mismatch_fraction": mismatch,
        "passed": mismatch <= settings["max_mismatch_fraction"],
        "features": columns,
        "unexplained": sorted(unexplained, key=lambda d: d["event_id"])[:SAMPLE_UNEXPLAINED],
    }


class CompareWithBatch(beam.PTransform):
    """{"served": PCollection[(event_id, served row)], "history": PCollection[Arrived]} ->
    {"counts": PCollection[(counter key, n)], "records": PCollection[difference record]}:
    the history's requests recomputed by the batch engine (WindowedFeatures), each joined
    with its served rows and judged (verdicts.py), and each difference explained from the
    observations of its key values (transforms/skew.py)."""

    def __init__(self, spec: FeatureSpec, start_us: Optional[int], end_us: Optional[int], fraction: float):
        super().__init__()
        self._spec, self._range, self._fraction = spec, (start_us, end_us), fraction

    def expand(self, inputs):
        spec, served, history = self._spec, inputs["served"], inputs["history"]
        bounds = (served | "ServedTimes" >> beam.MapTuple(lambda _, row: rfc3339_to_time_us(row["event_time"]))
                  | "ServedRange" >> beam.CombineGlobally(_TimeBounds()))
        unique = (history
                  | "Events" >> beam.Map(lambda arrived: arrived.event)
                  | "DeduplicateEvents" >> DeduplicateEvents(horizon_s=0))
        recomputed = (unique["events"]
                      | "WindowedFeatures" >> WindowedFeatures(spec)
                      | "BatchById" >> beam.Map(lambda row: (row.event.event_id, row)))
        compared = ({"served": served, "batch": recomputed} | "JoinById" >> beam.CoGroupByKey()
                    | "Compare" >> beam.ParDo(_Compare(spec, *self._range, self._fraction),
                                              logged=beam.pvalue.AsSingleton(bounds))
                    .with_outputs(DIFFERENCES, main="counters"))
        differences = compared[DIFFERENCES]

        # Only the observations of key values that have a difference travel on to be explained.
        by_key = differences | "ByKey" >> beam.FlatMap(_difference_keys(spec))
        keys = (by_key | "Keys" >> beam.Map(lambda item: item[0]) | "DistinctKeys" >> beam.Distinct()
                | "KeyFlags" >> beam.Map(lambda key: (key, True)))
        groups, layout = feature_groups(spec), EventLayout.of(spec)

        def observation_keys(arrived, wanted):
            keyed = ((group.name, event_key(layout, group, arrived.event)) for group in groups)
            return [(key, arrived) for key in keyed if key[1] is not None and key in wanted]

        observations = (
            history
            | "Observations" >> beam.Filter(lambda arrived: arrived.event.role != "request")
            | "ObservationKeys" >> beam.FlatMap(observation_keys, wanted=beam.pvalue.AsDict(keys)))
        explanations = ({"differences": by_key, "observations": observations} | "JoinByKey" >> beam.CoGroupByKey()
                        | "Explain" >> beam.ParDo(_Explain(spec)))
        records = ({"difference": differences, "explanations": explanations}
                   | "JoinDifference" >> beam.CoGroupByKey()
                   | "Finish" >> beam.Map(_finish_difference(spec)))
        counts = ((compared.counters, records | "DifferenceCounters" >> beam.FlatMap(_difference_counters))
                  | "CompareCounters" >> beam.Flatten())
        return {COUNTS: counts, RECORDS: records}

"""The consistency job's completeness check: every request of the history has
exactly one streamed prediction, or is reported by event_id and time.

    history requests in [start, end) (event_id, event time)
      \\
       CoGroupByKey(event_id) -> completeness_verdict (pure) -> counts, and a record per request
      /                                                          without a prediction (missing-*.ndjson)
    predictions (the streaming job's table or NDJSON rows, source "streaming", same range)

Each record is the request as the history holds it (its event JSON) with
"overdue": `python -m beam_app.publish --input 'missing-*.ndjson' --input_format
json` publishes them again, and the streaming job answers them if they are
within its allowed lateness.

A request without a prediction is *overdue* when its event time is more than
the allowed lateness before the end of the range (--end, or the history's
latest event when that is earlier): by then the streaming job must have
answered it, whatever order its messages came in. A request whose inference
failed is a dead letter (stage "inference") and is listed here too: the
job answered it with a reason, not a prediction. One in the range's last
allowed lateness may still be in flight: it is reported, and does not fail
the check.

Why a check and not only the job's own summary: a runner that acks a message
when it is pulled (the local DirectRunner) loses what was in flight at a crash,
and the job that crashed cannot report it. The history (the events archive, or
the publisher's --record) can.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import apache_beam as beam

from transforms import counters
from transforms.events import event_to_json
from transforms.spec import REQUEST

MISSING = "missing"
SAMPLE_MISSING = 100  # listed in consistency.json; missing-*.ndjson has them all
STREAMED = "streaming"  # the predictions' source the check counts (beam_app/bigquery/tables.py)


class Completeness(NamedTuple):
    """What one event_id adds to the counts (counter key -> n), and its record when it has no prediction."""

    counts: dict[str, int]
    missing: Optional[dict[str, Any]]


def overdue_before_us(end_us: Optional[int], latest_us: Optional[int], allowed_lateness_s: int) -> Optional[int]:
    """Requests before this time must have been answered: the end of the range
    less the allowed lateness. The end is `end_us` or the history's latest event
    (`latest_us`), whichever is earlier: an --end in the future must not make a
    request published a moment ago overdue. None for an empty history."""
    if latest_us is None:
        return None
    end = latest_us if end_us is None else min(end_us, latest_us)
    return end - allowed_lateness_s * 1_000_000


def completeness_verdict(event_id: str, requests: Iterable[tuple[int, str]], predictions: int,
                         overdue_before: Optional[int]) -> Completeness:
    """One event_id: its requests in the history as (time, event JSON) (copies of
    one request; the earliest counts), and how many streamed predictions it has."""
    copies = sorted(requests)
    counts: dict[str, int] = {}

    def count(counter: counters.Counter) -> None:
        counts[counter.key] = counts.get(counter.key, 0) + 1

    if not copies:
        if predictions:
            count(counters.PREDICTIONS_WITHOUT_REQUEST)
        return Completeness(counts, None)
    count(counters.HISTORY_REQUESTS)
    if predictions:
        count(counters.REQUESTS_ANSWERED)
        if predictions > 1:
            count(counters.REQUESTS_ANSWERED_MORE_THAN_ONCE)
        return Completeness(counts, None)
    time_us, event_json = copies[0]
    overdue = overdue_before is not None and time_us < overdue_before
    count(counters.REQUESTS_WITHOUT_PREDICTION)
    if overdue:
        count(counters.REQUESTS_WITHOUT_PREDICTION_OVERDUE)
    return Completeness(counts, {**json.loads(event_json), "overdue": overdue})


def in_range(time_us: int, start_us: Optional[int], end_us: Optional[int]) -> bool:
    """start <= time < end, either bound open (None)."""
    return (start_us is None or time_us >= start_us) and (end_us is None or time_us < end_us)


def is_streamed(row: Mapping[str, Any]) -> bool:
    """A predictions row the streaming job wrote (batch scoring writes source "batch")."""
    return row.get("source", STREAMED) == STREAMED


def sample_order(record: Mapping[str, Any]) -> tuple:
    """Which missing requests consistency.json lists first: the overdue, the earliest."""
    return not record["overdue"], record["event_time"], record["event_id"]


def completeness_summary(counts: Mapping[str, int], missing: list[dict], settings: Mapping[str, Any]) -> dict:
    """consistency.json's "completeness" part."""
    c = lambda counter: counter.of(counts)  # noqa: E731
    return {
        "predictions": settings["predictions"],
        "allowed_lateness_s": settings["allowed_lateness_s"],
        "requests": c(counters.HISTORY_REQUESTS),
        "answered": c(counters.REQUESTS_ANSWERED),
        "answered_more_than_once": c(counters.REQUESTS_ANSWERED_MORE_THAN_ONCE),
        "without_prediction": c(counters.REQUESTS_WITHOUT_PREDICTION),
        "without_prediction_overdue": c(counters.REQUESTS_WITHOUT_PREDICTION_OVERDUE),
        "predictions_without_request": c(counters.PREDICTIONS_WITHOUT_REQUEST),
        "missing": sorted(missing, key=sample_order)[:SAMPLE_MISSING],
    }


class _Latest(beam.CombineFn):
    """The latest event time of the history (None when empty)."""

    def create_accumulator(self):
        return None

    def add_input(self, latest, time_us):
        return time_us if latest is None else max(latest, time_us)

    def merge_accumulators(self, accumulators):
        present = [latest for latest in accumulators if latest is not None]
        return max(present) if present else None

    def extract_output(self, latest):
        return latest


class CheckCompleteness(beam.PTransform):
    """{"history": PCollection[Event], "predictions": PCollection[predictions row]} ->
    {"counts": PCollection[(counter key, 1)], "missing": PCollection[record]}: the history's
    requests in [start_us, end_us) joined with the streamed predictions by event_id (read
    for the same range: `read_served_rows`)."""

    def __init__(self, start_us: Optional[int], end_us: Optional[int], allowed_lateness_s: int):
        super().__init__()
        self._start_us, self._end_us, self._lateness_s = start_us, end_us, allowed_lateness_s

    def expand(self, inputs):
        history, predictions = inputs["history"], inputs["predictions"]
        start_us, end_us, lateness_s = self._start_us, self._end_us, self._lateness_s
        latest = (history | "EventTimes" >> beam.Map(lambda event: event.time_us)
                  | "Latest" >> beam.CombineGlobally(_Latest()))
        requests = (history
                    | "Requests" >> beam.Filter(lambda event: event.role == REQUEST
                                                and in_range(event.time_us, start_us, end_us))
                    | "RequestById" >> beam.Map(lambda event: (event.event_id, (event.time_us, event_to_json(event)))))
        predicted = (predictions
                     | "Streamed" >> beam.Filter(is_streamed)
                     | "PredictionById" >> beam.Map(lambda row: (row["event_id"], row["event_time"])))

        def verdict(joined, latest_us):
            event_id, sides = joined
            result = completeness_verdict(event_id, sides["requests"], len(list(sides["predictions"])),
                                          overdue_before_us(end_us, latest_us, lateness_s))
            yield from result.counts.items()
            if result.missing is not None:
                yield beam.pvalue.TaggedOutput(MISSING, result.missing)

        checked = ({"requests": requests, "predictions": predicted} | "JoinPredictions" >> beam.CoGroupByKey()
                   | "Verdicts" >> beam.FlatMap(verdict, latest_us=beam.pvalue.AsSingleton(latest))
                   .with_outputs(MISSING, main="counts"))
        return {"counts": checked.counts, MISSING: checked[MISSING]}

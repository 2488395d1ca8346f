"""The rows the streaming job and batch scoring make, around the model:

    PubsubMessage -> RawRecord (`message_to_record`): what the parser reads
    KeyedPredictions -> ToPredictionRows (`request_rows`) -> a predictions row per request, and
        (tagged SERVED_FEATURES) a served-features row for each request in the sample
    Event -> ToEventRows (`event_row`) -> an events table row, stamped with its arrival
    DeadLetter -> CountDeadLetters -> the same DeadLetter, counted per stage

Each DoFn adds the counters and the wall clock (injected) to a pure function;
the row functions themselves are in bigquery/tables.py, beside the schemas.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage

from beam_app.bigquery.tables import (SERVED_FEATURES, event_fields, event_row, in_served_sample, prediction_row,
                                      served_features_row)
from models.inference import KeyedPredictions, per_request
from transforms import counters
from transforms.events import DeadLetter, RawRecord
from transforms.examples import decode_example
from transforms.spec import FeatureSpec


def message_to_record(message: PubsubMessage) -> RawRecord:
    """A Pub/Sub message -> the record the parser reads; bytes that are not
    UTF-8 become U+FFFD, which the parser turns into a dead letter."""
    text = (message.data or b"").decode("utf-8", errors="replace")
    return RawRecord(f"pubsub:{message.message_id}", text, "json", attributes=dict(message.attributes or {}))


class RequestRows(NamedTuple):
    """One request's rows: its prediction, and its served features when it is in the sample (else None)."""
    prediction: dict[str, Any]
    served_features: Optional[dict[str, Any]]


def request_rows(predictions: KeyedPredictions, spec: FeatureSpec, processed_at_us: int, source: str,
                 served_fraction: Optional[float] = None, job_started_us: int = 0) -> Iterator[RequestRows]:
    """KeyedPredictions (one model call's answers) -> per request (`per_request`:
    exactly one each, in order) its predictions row (`source`: streaming or
    batch) and, with `served_fraction`, for the requests in the sample
    (`in_served_sample`), the example it was made from, decoded: what the model
    received, not what we think we sent it (job_started_us: in each such row)."""
    for key, result in per_request(predictions):
        served = None
        if served_fraction is not None and in_served_sample(key.event_id, served_fraction):
            served = served_features_row(key, decode_example(spec, result.example), result.model_id,
                                         spec.fingerprint, processed_at_us, job_started_us)
        yield RequestRows(prediction_row(key, result.inference, result.model_id, spec.fingerprint, processed_at_us,
                                         source), served)


class ToPredictionRows(beam.DoFn):
    """KeyedPredictions -> `request_rows`: the predictions rows (main output)
    and the served-features rows (tagged SERVED_FEATURES), counted. One step
    for both, as each step costs the streaming DirectRunner per bundle."""

    def __init__(self, spec: FeatureSpec, clock: Callable[[], float], source: str,
                 served_fraction: Optional[float] = None, job_started_us: int = 0):
        self._spec = spec
        self._clock = clock  # injectable: tests pin processing_time
        self._source = source
        self._served_fraction = served_fraction
        self._job_started_us = job_started_us
        self._rows = counters.PREDICTION_ROWS.metric()
        self._served = counters.SERVED_FEATURES_ROWS.metric()

    def process(self, predictions: KeyedPredictions):
        now_us = int(self._clock() * 1e6)
        for rows in request_rows(predictions, self._spec, now_us, self._source, self._served_fraction,
                                 self._job_started_us):
            self._rows.inc()
            yield rows.prediction
            if rows.served_features is not None:
                self._served.inc()
                yield beam.pvalue.TaggedOutput(SERVED_FEATURES, rows.served_features)


class ToEventRows(beam.DoFn):
    """An accepted Event -> an events table row (`event_row`), stamped with its arrival (wall clock)."""

    def __init__(self, spec: FeatureSpec, clock: Callable[[], float]):
        self._names = tuple(event_fields(spec))
        self._clock = clock
        self._rows = counters.EVENTS_ARCHIVED.metric()

    def process(self, event):
        self._rows.inc()
        yield event_row(event, self._names, int(self._clock() * 1e6))


class CountDeadLetters(beam.DoFn):
    """DeadLetter -> the same DeadLetter, counted per stage (dead_letters/<stage>)."""

    def __init__(self):
        self._counters = {}

    def process(self, dead: DeadLetter):
        if dead.stage not in self._counters:
            self._counters[dead.stage] = counters.dead_letters(dead.stage).metric()
        self._counters[dead.stage].inc()
        yield dead

"""Online scoring without HTTP: instances in, answers out (service.py is the thin web layer).

    {"instances": [request events, as the stream carries them]}
      -> parse_instance: the stream's validation (EventValidator) and its time rule
         (check_time_bounds): a refusal names the instance, the field and the reason
      -> the store's rows for every instance, and its progress, in one read
      -> layout.answer: the jobs' engine (KeyHistory) over the observations of [t - W, t)
      -> the jobs' encoder (rows_to_record_batch, tfx-bsl) -> one model call for the instances
      -> per instance: the prediction, the model version, the spec fingerprint, the
         windowed features, and the store's lag for it; a served-features row (source online)

Nothing here is written for the service alone but the parsing of a JSON
instance: the features, the example bytes and the model call are the ones
the jobs use, which is what makes them equal to batch bit for bit.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, NamedTuple, Optional

from beam_app.bigquery.tables import served_features_row
from beam_app.online.bigtable_store import OnlineStore
from beam_app.online.layout import RowRead, answer, rows_to_read, store_lag_s
from models.inference import LoadedModel, predict
from transforms.event_time import TimeBounds, check_time_bounds
from transforms.events import Event, InvalidRecord, rfc3339_to_time_us, time_us_to_rfc3339
from transforms.examples import RequestKey, decode_example, rows_to_record_batch
from transforms.feature_layout import EventLayout, FeatureRow, feature_groups
from transforms.parse import EventValidator
from transforms.spec import REQUEST, FeatureSpec

MAX_INSTANCES = 1000  # per call: a bigger batch is a batch job (beam_app.predict)


class InstanceError(ValueError):
    """A request the service refuses (400): which instance, which field, and why."""

    def __init__(self, reason: str, index: Optional[int] = None, field: Optional[str] = None):
        super().__init__(reason)
        self.reason, self.index, self.field = reason, index, field

    def to_json(self) -> dict[str, Any]:
        return {"error": self.reason, "instance": self.index, "field": self.field}


def _field_of(reason: str) -> Optional[str]:
    """The field an InvalidRecord reason names first ("carrier: unknown value ...")."""
    head, sep, _ = reason.partition(":")
    return head if sep and head.isidentifier() else None


def parse_instance(validate: EventValidator, instance: Any, now_us: int, bounds: TimeBounds,
                   index: Optional[int] = None) -> Event:
    """One instance (a request event as JSON: event_id, role "request" (the default), event_time
    (RFC 3339, default now), and the request's fields) -> the validated Event; InstanceError otherwise."""
    if not isinstance(instance, dict):
        raise InstanceError(f"expected a JSON object (a request event), got {type(instance).__name__}", index)
    role = instance.get("role", REQUEST)
    if role != REQUEST:
        raise InstanceError(f"role: only request events are answered, got {role!r}", index, "role")
    event_id = instance.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        raise InstanceError(f"event_id: expected a non-empty string, got {event_id!r}", index, "event_id")
    fields = {name: value for name, value in instance.items() if name not in ("event_id", "role", "event_time")}
    try:
        stamp = instance.get("event_time")
        if stamp is None:
            time_us = now_us
        elif isinstance(stamp, str):
            time_us = rfc3339_to_time_us(stamp)
        else:
            raise InvalidRecord(f"event_time: expected an RFC 3339 string, got {stamp!r}")
        event = validate(Event(event_id, REQUEST, time_us, fields))
        check_time_bounds(event, now_us, bounds)
    except (InvalidRecord, OverflowError, ValueError) as err:
        reason = str(err)
        raise InstanceError(reason, index, _field_of(reason)) from None
    return event


def parse_body(validate: EventValidator, body: Any, now_us: int, bounds: TimeBounds) -> list[Event]:
    """{"instances": [...]} -> their Events, in order; InstanceError for the first that is refused."""
    if not isinstance(body, dict) or "instances" not in body:
        raise InstanceError('expected a JSON object {"instances": [request events]}', field="instances")
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise InstanceError("instances: expected a non-empty list of request events", field="instances")
    if len(instances) > MAX_INSTANCES:
        raise InstanceError(f"instances: at most {MAX_INSTANCES} per call, got {len(instances)}: score more with "
                            "python -m beam_app.predict", field="instances")
    return [parse_instance(validate, instance, now_us, bounds, index) for index, instance in enumerate(instances)]


def _merge(reads: list[RowRead]) -> list[RowRead]:
    """One read per row, covering every instance's range of it."""
    merged: dict[bytes, RowRead] = {}
    for read in reads:
        held = merged.get(read.row)
        merged[read.row] = read if held is None else held._replace(
            start_ms=min(held.start_ms, read.start_ms), end_ms=max(held.end_ms, read.end_ms))
    return list(merged.values())


class Answers(NamedTuple):
    """One call's answers: the response body, and the served-features rows to log."""

    body: dict[str, Any]
    served_rows: list[dict[str, Any]]
    rows_read: int
    lag_s: Optional[float]  # the largest lag among the instances (None: the store has no progress yet)


class OnlineScorer:
    """Answers calls from the store and the model. `model` returns the model to use now (a
    LoadedModel, or ServingModel.model, which follows LATEST); `clock` is injectable for tests."""

    def __init__(self, spec: FeatureSpec, store: OnlineStore, model: Callable[[], LoadedModel],
                 bounds: TimeBounds, clock: Callable[[], float] = time.time, started_us: int = 0):
        from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

        self.spec = spec
        self._store = store
        self._model = model
        self._bounds = bounds
        self._clock = clock
        self._started_us = started_us
        self._validate = EventValidator(spec)
        self._layout = EventLayout.of(spec)
        self._groups = feature_groups(spec)
        self._names = tuple(f.name for f in spec.windowed_features)
        self._encoder = RecordBatchToExamplesEncoder()

    def parse(self, body: Any) -> list[Event]:
        return parse_body(self._validate, body, int(self._clock() * 1e6), self._bounds)

    def score(self, events: list[Event]) -> Answers:
        """Raises StoreUnavailable when the store does not answer."""
        reads = _merge([read for event in events for read in rows_to_read(self._layout, self._groups, event)])
        cells, through_us = self._store.read(reads, with_through=True)
        rows = [FeatureRow(event, answer(self._layout, self._groups, event, len(self._names), cells,
                                         self._bounds.allowed_lateness_s)) for event in events]
        examples = self._encoder.encode(rows_to_record_batch(self.spec, rows, with_label=False))
        model = self._model()
        predictions = predict(examples, model)
        now_us = int(self._clock() * 1e6)
        answers, served, lags = [], [], []
        for row, example, prediction in zip(rows, examples, predictions):
            event = row.event
            lag = store_lag_s(through_us, event.time_us)
            lags.append(lag)
            answers.append({
                "event_id": event.event_id, "event_time": time_us_to_rfc3339(event.time_us),
                "prediction": prediction, "model_version": model.version, "spec_fingerprint": self.spec.fingerprint,
                "features": dict(zip(self._names, (list(v) if isinstance(v, tuple) else v for v in row.features))),
                "store": {"complete_through": time_us_to_rfc3339(through_us) if through_us is not None else None,
                          "lag_s": lag, "complete": lag == 0},
            })
            served.append(served_features_row(RequestKey(event.event_id, event.time_us),
                                              decode_example(self.spec, example), model.version,
                                              self.spec.fingerprint, now_us, self._started_us, source="online"))
        known = [lag for lag in lags if lag is not None]
        return Answers({"predictions": answers}, served, len(cells),
                       max(known) if len(known) == len(lags) else None)


def instance_json(event: Event) -> Mapping[str, Any]:
    """An Event -> the instance that asks for it (what a client sends): the inverse of parse_instance."""
    return {"event_id": event.event_id, "role": REQUEST, "event_time": time_us_to_rfc3339(event.time_us),
            **{name: value for name, value in event.fields.items() if value is not None}}

"""Online scoring without HTTP: instances in, answers out (service.py is the thin web layer).

    {"instances": [request events, as the stream carries them]}
      -> parse_instance: the stream's validation (EventValidator) and its time rule
         (check_time_bounds): a refusal names the instance, the field and the reason
      -> the store's rows for every instance, and its progress, in one read
      -> layout.answer: the jobs' engine (KeyHistory) over the observations of [t - W, t)
      -> the jobs' encoder (rows_to_record_batch, tfx-bsl) -> one model call for the instances
      -> per instance: the prediction, the model version, the spec fingerprint, the
         windowed features, and the store's lag for it; a served-features row (source online)

Concurrent calls are scored together (`Batcher`): what arrives while a batch is
scored is the next batch.

Nothing here is written for the service alone but the parsing of a JSON
instance: the features, the example bytes and the model call are the ones
the jobs use, which is what makes them equal to batch bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

from beam_app.bigquery.tables import served_features_row
from beam_app.online.bigtable_store import OnlineStore
from beam_app.online.layout import answer, rows_to_read, store_lag_s
from models.inference import LoadedModel, predict
from transforms.event_time import TimeBounds, check_time_bounds
from transforms.events import Event, InvalidRecord, rfc3339_to_time_us, time_us_to_rfc3339
from transforms.examples import RequestKey, decode_example, rows_to_record_batch
from transforms.feature_layout import EventLayout, FeatureRow, feature_groups
from transforms.parse import EventValidator
from transforms.spec import REQUEST, FeatureSpec

MAX_INSTANCES = 1000  # per call: a bigger batch is a batch job (beam_app.predict)
LINGER_S = 0.002  # under load, how long a batch waits for more calls


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


class Scored(NamedTuple):
    """The answers to some instances, in their order: each answer (the response's), each served-features
    row (None when nothing is logged), each lag (store_lag_s), and the rows the store read for them."""

    answers: list[dict[str, Any]]
    served_rows: list[Optional[dict[str, Any]]]
    lags: list[Optional[float]]
    rows_read: int


class OnlineScorer:
    """Answers instances from the store and the model. `model` returns the model to use now (a
    LoadedModel, or ServingModel.model, which follows LATEST); `clock` is injectable for tests;
    `log_served`: make each answer's served-features row."""

    def __init__(self, spec: FeatureSpec, store: OnlineStore, model: Callable[[], LoadedModel],
                 bounds: TimeBounds, clock: Callable[[], float] = time.time, started_us: int = 0,
                 log_served: bool = True):
        from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

        self.spec = spec
        self._store = store
        self._model = model
        self._bounds = bounds
        self._clock = clock
        self._started_us = started_us
        self._log_served = log_served
        self._validate = EventValidator(spec)
        self._layout = EventLayout.of(spec)
        self._groups = feature_groups(spec)
        self._names = tuple(f.name for f in spec.windowed_features)
        self._encoder = RecordBatchToExamplesEncoder()

    def parse(self, body: Any) -> list[Event]:
        return parse_body(self._validate, body, int(self._clock() * 1e6), self._bounds)

    def score(self, events: list[Event]) -> Scored:
        """Every instance's answer, with one store read, one encoding and one model call for them
        all. Raises StoreUnavailable when the store does not answer."""
        reads = [read for event in events for read in rows_to_read(self._layout, self._groups, event)]
        cells, through_us = self._store.read(reads, with_through=True)
        rows = [FeatureRow(event, answer(self._layout, self._groups, event, len(self._names), cells,
                                         self._bounds.allowed_lateness_s)) for event in events]
        examples = self._encoder.encode(rows_to_record_batch(self.spec, rows, with_label=False))
        model = self._model()
        predictions = predict(examples, model)
        now_us = int(self._clock() * 1e6)
        through = time_us_to_rfc3339(through_us) if through_us is not None else None
        answers, served, lags = [], [], []
        for row, example, prediction in zip(rows, examples, predictions):
            event = row.event
            lag = store_lag_s(through_us, event.time_us)
            lags.append(lag)
            answers.append({
                "event_id": event.event_id, "event_time": time_us_to_rfc3339(event.time_us),
                "prediction": prediction, "model_version": model.version, "spec_fingerprint": self.spec.fingerprint,
                "features": dict(zip(self._names, (list(v) if isinstance(v, tuple) else v for v in row.features))),
                "store": {"complete_through": through, "lag_s": lag, "complete": lag == 0},
            })
            served.append(served_features_row(RequestKey(event.event_id, event.time_us),
                                              decode_example(self.spec, example), model.version,
                                              self.spec.fingerprint, now_us, self._started_us, source="online")
                          if self._log_served else None)
        return Scored(answers, served, lags, len(cells))


class CallAnswers(NamedTuple):
    """One call's share of a batch: its response body, its served-features rows, its largest lag
    (None when any instance's is unknown), and the store rows its batch read (counted on the
    batch's first call only, so that the sum over calls is the rows read)."""

    body: dict[str, Any]
    served_rows: list[dict[str, Any]]
    lag_s: Optional[float]
    rows_read: int
    batch_calls: int  # how many calls were scored together with this one (itself included)


class Batcher:
    """Scores concurrent calls together, on one thread: the calls that arrive while a batch is
    scored are the next batch (up to MAX_INSTANCES instances), with no waiting added. A call
    alone is scored at once; under load, one store read, one encoding and one model call
    serve several calls, whose per-call cost (a gRPC stream, an Arrow batch, a TensorFlow
    call: 1 to 3 ms each) dominated a single instance. A batch that fails fails each of its
    calls with the same error (a store that does not answer does not answer any of them)."""

    def __init__(self, score: Callable[[list[Event]], Scored], max_instances: int = MAX_INSTANCES):
        self._score = score
        self._max = max_instances
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="online-batcher", daemon=True)
        self._thread.start()

    def submit(self, events: list[Event]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((events, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        busy = False  # the last batch had company: calls are arriving faster than batches are scored
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, size = [item], len(item[0])
            # Under load, wait a little for the calls on their way: fewer, larger batches. A call
            # that came alone (no load) is scored at once.
            deadline = time.monotonic() + (LINGER_S if busy else 0)
            while size < self._max:
                try:
                    timeout = deadline - time.monotonic()
                    item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
                size += len(item[0])
            busy = len(batch) > 1
            self._answer(batch)

    def _answer(self, batch: list) -> None:
        try:
            scored = self._score([event for events, _ in batch for event in events])
        except BaseException as err:  # noqa: BLE001 - handed to each caller, who answers 503 or 500
            for _, future in batch:
                future.set_exception(err)
            return
        at = 0
        for index, (events, future) in enumerate(batch):
            end = at + len(events)
            lags = scored.lags[at:end]
            future.set_result(CallAnswers(
                {"predictions": scored.answers[at:end]}, [row for row in scored.served_rows[at:end] if row],
                None if None in lags else max(lags), scored.rows_read if index == 0 else 0, len(batch)))
            at = end

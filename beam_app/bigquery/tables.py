"""The BigQuery tables the streaming job writes: their schemas (the one
source every table is created from, by the job, the local demo and the
deployment) and the pure functions that make their rows.

- predictions: one row per request event, from the streaming job or the
  batch scoring job (`source` says which).
- dead letters: everything the job could not turn into a prediction, with
  the reason: unparseable messages, failed inferences, rows BigQuery refused.
- served features (optional): per prediction (or a sample of them), the
  features exactly as the model received them: one column per example
  column but the id and the label (static fields, presence flags, windowed
  features), decoded from the very tf.Example bytes scored. The schema comes
  from the spec.
- events (optional): every event the job accepted (parsed, and the first
  copy of its identity), with its fields: history for the next training and
  for the consistency job.

Timestamps go to BigQuery as RFC 3339 strings.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Iterable, Optional

from transforms.events import DeadLetter, Event, time_us_to_rfc3339
from transforms.examples import ExampleColumn, RequestKey, example_columns
from transforms.spec import FeatureSpec, SpecError

PREDICTIONS_SCHEMA: tuple[dict[str, str], ...] = (
    {"name": "event_id", "type": "STRING", "mode": "REQUIRED", "description": "The request event's id."},
    {"name": "event_time", "type": "TIMESTAMP", "mode": "REQUIRED", "description": "The request's event time."},
    {"name": "prediction", "type": "FLOAT64", "mode": "REQUIRED", "description": "The model's output (label units)."},
    {"name": "model_version", "type": "STRING", "mode": "REQUIRED",
     "description": "The training run that produced the model."},
    {"name": "spec_fingerprint", "type": "STRING", "mode": "REQUIRED",
     "description": "sha256 of the feature spec the features were computed with."},
    {"name": "processing_time", "type": "TIMESTAMP", "mode": "REQUIRED",
     "description": "When the job made the row (wall clock)."},
    # NULLABLE: BigQuery adds only NULLABLE columns to an existing table (`bq update` with the schema).
    {"name": "source", "type": "STRING", "mode": "NULLABLE",
     "description": "The job that made the row: streaming (beam_app.streaming) or batch (beam_app.predict); "
                    "null in rows written before the column existed."},
)
PREDICTION_SOURCES = ("streaming", "batch")

# The tables by the names a job's outputs, its `job_tables` and its summary's counts use.
PREDICTIONS, DEAD_LETTERS, SERVED_FEATURES, EVENTS = "predictions", "dead_letters", "served_features", "events"

DEAD_LETTERS_SCHEMA: tuple[dict[str, str], ...] = (
    {"name": "stage", "type": "STRING", "mode": "REQUIRED",
     "description": "The step that gave up: parse, inference or bigquery."},
    {"name": "source", "type": "STRING", "mode": "NULLABLE",
     "description": "Where the record came from: pubsub:<message id>, event:<event id> or the table it missed."},
    {"name": "payload", "type": "STRING", "mode": "NULLABLE",
     "description": "The record as received: message text, base64 tf.Example, or the row as JSON."},
    {"name": "attributes", "type": "STRING", "mode": "NULLABLE", "description": "Message attributes as JSON."},
    {"name": "error", "type": "STRING", "mode": "REQUIRED", "description": "Why it was rejected."},
    {"name": "processing_time", "type": "TIMESTAMP", "mode": "REQUIRED",
     "description": "When the job rejected it (wall clock)."},
)


def table_schema(fields: tuple[dict[str, str], ...]) -> dict[str, Any]:
    """The schema as WriteToBigQuery and the BigQuery REST API take it."""
    return {"fields": [dict(field) for field in fields]}


def prediction_row(key: RequestKey, prediction: float, model_version: str, spec_fingerprint: str,
                   processed_at_us: int, source: str) -> dict[str, Any]:
    if source not in PREDICTION_SOURCES:
        raise ValueError(f"a prediction's source is one of {PREDICTION_SOURCES}, not {source!r}")
    return {
        "event_id": key.event_id,
        "event_time": time_us_to_rfc3339(key.time_us),
        "prediction": prediction,
        "model_version": model_version,
        "spec_fingerprint": spec_fingerprint,
        "processing_time": time_us_to_rfc3339(processed_at_us),
        "source": source,
    }


def dead_letter_row(dead: DeadLetter, processed_at_us: int) -> dict[str, Any]:
    return {
        "stage": dead.stage,
        "source": dead.source,
        "payload": dead.raw,
        "attributes": json.dumps(dead.attributes, sort_keys=True) if dead.attributes is not None else None,
        "error": dead.reason,
        "processing_time": time_us_to_rfc3339(processed_at_us),
    }


def failed_inference_letters(batch: Iterable[tuple[RequestKey, bytes]], error: tuple) -> list[DeadLetter]:
    """A batch RunInference could not score (a KeyedBatch, or any (key,
    example) pairs), with (exception type, repr, traceback lines) as
    `with_exception_handling` gives them -> one dead letter per example (the
    payload is the tf.Example, base64, to replay it)."""
    reason = f"inference failed: {error[1]}"
    return [DeadLetter(f"event:{key.event_id}", base64.b64encode(example).decode(), reason, "inference")
            for key, example in batch]


def failed_row_letter(destination: Any, row: dict[str, Any], errors: Optional[Any]) -> DeadLetter:
    """A row BigQuery refused (what WriteToBigQuery's failed_rows_with_errors holds)."""
    return DeadLetter(str(destination), json.dumps(row, sort_keys=True, default=str),
                      f"BigQuery rejected the row: {json.dumps(errors, default=str)}", "bigquery")


# The served-features and events tables: one column per spec field or example column, beside these.
SERVED_METADATA: tuple[dict[str, str], ...] = (
    {"name": "event_id", "type": "STRING", "mode": "REQUIRED", "description": "The request event's id."},
    {"name": "event_time", "type": "TIMESTAMP", "mode": "REQUIRED", "description": "The request's event time."},
    {"name": "model_version", "type": "STRING", "mode": "REQUIRED",
     "description": "The model version that received these features."},
    {"name": "spec_fingerprint", "type": "STRING", "mode": "REQUIRED",
     "description": "sha256 of the feature spec the features were computed with."},
    {"name": "processing_time", "type": "TIMESTAMP", "mode": "REQUIRED",
     "description": "When the job made the row, after the model answered (wall clock)."},
    {"name": "job_start_time", "type": "TIMESTAMP", "mode": "REQUIRED",
     "description": "When the job that served it started: what it could not have received before, it had "
                    "only from a warm start."},
    # NULLABLE: BigQuery adds only NULLABLE columns to an existing table (`bq update` with the schema).
    {"name": "source", "type": "STRING", "mode": "NULLABLE",
     "description": "What served it: streaming (beam_app.streaming) or online (beam_app.serve); null in rows "
                    "written before the column existed."},
)
SERVED_SOURCES = ("streaming", "online")
EVENTS_METADATA: tuple[dict[str, str], ...] = (
    {"name": "event_id", "type": "STRING", "mode": "REQUIRED", "description": "The event's id."},
    {"name": "role", "type": "STRING", "mode": "REQUIRED", "description": "request, or the kind of observation (observation in a one-kind spec)."},
    {"name": "event_time", "type": "TIMESTAMP", "mode": "REQUIRED", "description": "The event time."},
    {"name": "processing_time", "type": "TIMESTAMP", "mode": "REQUIRED",
     "description": "When the job accepted the event (wall clock): its arrival."},
)
# Rows of the four tables go through one WriteToBigQuery and are told apart by these columns
# (`row_table`): no spec field or feature may take one of their names.
RESERVED_COLUMNS = frozenset({field["name"] for field in (*SERVED_METADATA, *EVENTS_METADATA)}
                             | {field["name"] for field in (*PREDICTIONS_SCHEMA, *DEAD_LETTERS_SCHEMA)})
_BIGQUERY_TYPE = {"bytes": "STRING", "int64": "INT64", "float32": "FLOAT64",
                  "string": "STRING", "int": "INT64", "float": "FLOAT64"}


def check_column_names(spec: FeatureSpec) -> None:
    """Refuses a spec whose fields or features would collide with the tables' own columns."""
    names = {column.name for column in served_columns(spec)} | set(event_fields(spec))
    clash = sorted(names & RESERVED_COLUMNS)
    if clash:
        raise SpecError(f"spec {spec.name!r}: {', '.join(clash)} would collide with the columns the streaming job "
                        f"writes beside the features ({', '.join(sorted(RESERVED_COLUMNS))}): rename them")


def served_columns(spec: FeatureSpec) -> tuple[ExampleColumn, ...]:
    """The example columns the model receives and the served-features table logs (all but id and label)."""
    return tuple(column for column in example_columns(spec) if column.role not in ("id", "label"))


def served_features_schema(spec: FeatureSpec) -> tuple[dict[str, str], ...]:
    return SERVED_METADATA + tuple(
        {"name": column.name, "type": _BIGQUERY_TYPE[column.dtype], "mode": "REPEATED" if column.is_sequence else "NULLABLE",
         "description": f"{column.role} feature, as the model received it"
                        + (" (0/1)" if column.role in ("presence", "static_presence") else "")
                        + (f" ({column.size} values, newest first)" if column.is_sequence else "")}
        for column in served_columns(spec))


def event_fields(spec: FeatureSpec) -> dict[str, str]:
    """Every field an event of any role may carry (the label included), name -> spec type."""
    fields: dict[str, str] = {}
    for field in (*spec.request_fields, spec.label, *(f for kind in spec.kinds for f in kind.fields)):
        if fields.setdefault(field.name, field.type) != field.type:
            raise SpecError(f"spec {spec.name!r}: field {field.name!r} is {fields[field.name]} in one role and "
                            f"{field.type} in another: the events table needs one type per name")
    return fields


def events_schema(spec: FeatureSpec) -> tuple[dict[str, str], ...]:
    return EVENTS_METADATA + tuple(
        {"name": name, "type": _BIGQUERY_TYPE[kind], "mode": "NULLABLE", "description": "A field of the event."}
        for name, kind in event_fields(spec).items())


def in_served_sample(event_id: str, rate: float) -> bool:
    """Whether a request is in the served-features log at `rate`: by a hash
    of its id, so the sample is the same in every run, and the consistency
    job knows which requests must have been logged."""
    if rate >= 1:
        return True
    digest = hashlib.sha256(event_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < rate * 2 ** 64


def served_features_row(key: RequestKey, features: dict[str, Any], model_version: str, spec_fingerprint: str,
                        processed_at_us: int, job_started_us: int, source: str = "streaming") -> dict[str, Any]:
    """`features`: the decoded example (transforms.examples.decode_example), every served column.
    job_started_us: when the streaming job, or the online service, started."""
    if source not in SERVED_SOURCES:
        raise ValueError(f"a served row's source is one of {SERVED_SOURCES}, not {source!r}")
    return {"event_id": key.event_id, "event_time": time_us_to_rfc3339(key.time_us), "model_version": model_version,
            "spec_fingerprint": spec_fingerprint, "processing_time": time_us_to_rfc3339(processed_at_us),
            "job_start_time": time_us_to_rfc3339(job_started_us), "source": source, **features}


def event_row(event: Event, names: Iterable[str], processed_at_us: int) -> dict[str, Any]:
    """An accepted event -> an events table row (`names`: `event_fields(spec)`)."""
    return {"event_id": event.event_id, "role": event.role, "event_time": time_us_to_rfc3339(event.time_us),
            "processing_time": time_us_to_rfc3339(processed_at_us),
            **{name: event.fields.get(name) for name in names}}


def row_table(row: dict[str, Any]) -> str:
    """Which table a row of the job belongs to: dead_letters, predictions, events or served_features."""
    if "stage" in row:
        return DEAD_LETTERS
    if "prediction" in row:
        return PREDICTIONS
    return EVENTS if "role" in row else SERVED_FEATURES

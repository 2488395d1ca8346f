"""The two BigQuery tables the streaming job writes: their schemas (the one
source every table is created from, by the job, the local demo and the
deployment) and the pure functions that make their rows.

- predictions: one row per request event.
- dead letters: everything the job could not turn into a prediction, with
  the reason: unparseable messages, failed inferences, rows BigQuery refused.

Timestamps go to BigQuery as RFC 3339 strings.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Optional

from transforms.events import DeadLetter, time_us_to_rfc3339
from transforms.examples import RequestKey

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
)

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
                   processed_at_us: int) -> dict[str, Any]:
    return {
        "event_id": key.event_id,
        "event_time": time_us_to_rfc3339(key.time_us),
        "prediction": prediction,
        "model_version": model_version,
        "spec_fingerprint": spec_fingerprint,
        "processing_time": time_us_to_rfc3339(processed_at_us),
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


def is_dead_letter_row(row: dict[str, Any]) -> bool:
    """Tells the two tables' rows apart (only dead letters have a stage)."""
    return "stage" in row


def failed_inference_letters(batch: list[tuple[RequestKey, bytes]], error: tuple) -> list[DeadLetter]:
    """A batch RunInference could not score, with (exception type, repr,
    traceback lines) as `with_exception_handling` gives them -> one dead
    letter per example (the payload is the tf.Example, base64, to replay it)."""
    reason = f"inference failed: {error[1]}"
    return [DeadLetter(f"event:{key.event_id}", base64.b64encode(example).decode(), reason, "inference")
            for key, example in batch]


def failed_row_letter(destination: Any, row: dict[str, Any], errors: Optional[Any]) -> DeadLetter:
    """A row BigQuery refused (what WriteToBigQuery's failed_rows_with_errors holds)."""
    return DeadLetter(str(destination), json.dumps(row, sort_keys=True, default=str),
                      f"BigQuery rejected the row: {json.dumps(errors, default=str)}", "bigquery")

"""The local streaming stack that `make demo`, `make serve` and `make loop` share: the Pub/Sub and
BigQuery emulators, the topic, the job's subscription, and the streaming job as a subprocess
writing the demo's tables; and the small helpers around them. Not a command."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from beam_app.bigquery.client import bigquery_client, table_exists
from beam_app.common.errors import EXIT_USAGE
from beam_app.local.stack import DEFAULT_PROJECT, BigQueryEmulator, PubSubEmulator

TOPIC = f"projects/{DEFAULT_PROJECT}/topics/events"
SUBSCRIPTION = f"projects/{DEFAULT_PROJECT}/subscriptions/streaming-job"
PREDICTIONS = f"{DEFAULT_PROJECT}:demo.predictions"
DEAD_LETTERS = f"{DEFAULT_PROJECT}:demo.dead_letters"
SERVED_FEATURES = f"{DEFAULT_PROJECT}:demo.served_features"
EVENTS = f"{DEFAULT_PROJECT}:demo.events"


class Stack(NamedTuple):
    pubsub: PubSubEmulator
    bigquery: BigQueryEmulator
    job: subprocess.Popen


def streaming_job_command(model: str, bigquery_endpoint: str) -> list[str]:
    return [sys.executable, "-m", "beam_app.streaming", "--runner", "DirectRunner",
            "--input_subscription", SUBSCRIPTION, "--model", model, "--predictions_table", PREDICTIONS,
            "--dead_letter_table", DEAD_LETTERS, "--served_features", SERVED_FEATURES, "--events_table", EVENTS,
            "--create_tables", "--bigquery_endpoint", bigquery_endpoint]


@contextlib.contextmanager
def streaming_stack(model: str, job_log: Path,
                    job_command: Callable[[str, str], list[str]] = streaming_job_command) -> Iterator[Stack]:
    """Both emulators, the topic and subscription, and the streaming job (a
    subprocess writing to job_log, made by job_command(model, BigQuery
    endpoint)); everything stops on exit."""
    with PubSubEmulator() as pubsub, BigQueryEmulator(DEFAULT_PROJECT) as bigquery:
        os.environ.update(pubsub.env)
        from google.cloud import pubsub_v1

        pubsub_v1.PublisherClient().create_topic(name=TOPIC)
        pubsub_v1.SubscriberClient().create_subscription(name=SUBSCRIPTION, topic=TOPIC)
        command = job_command(model, bigquery.endpoint)
        with open(job_log, "w") as log:
            job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            wait_for_tables(bigquery, job, job_log)
            yield Stack(pubsub, bigquery, job)
        finally:
            stop_job(job)


def wait_for_tables(bigquery: BigQueryEmulator, job: subprocess.Popen, job_log: Path, timeout_s: float = 120) -> None:
    """The job creates its tables once it has loaded and checked the model."""
    client = bigquery_client(DEFAULT_PROJECT, bigquery.endpoint)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise RuntimeError(f"the streaming job exited with {job.returncode}:\n{job_log.read_text()[-3000:]}")
        if table_exists(client, PREDICTIONS) and table_exists(client, DEAD_LETTERS):
            time.sleep(3)  # the pipeline starts its reader just after creating the tables
            return
        time.sleep(0.5)
    raise RuntimeError(f"the streaming job did not start within {timeout_s:.0f} s; its log: {job_log}")


def stop_job(job: subprocess.Popen) -> None:
    """Ctrl-C, as a user would: the job prints its summary and exits."""
    if job.poll() is None:
        job.send_signal(signal.SIGINT)
        try:
            job.wait(60)
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait(10)


def query(bigquery: BigQueryEmulator, sql: str) -> list[dict]:
    return [dict(row.items()) for row in bigquery_client(DEFAULT_PROJECT, bigquery.endpoint).query(sql).result()]


def require_model(model: str, prog: str) -> None:
    """Exits with a usage error when there is no model at `model` (a local command needs `make run` first)."""
    if not (Path(model) / "LATEST").exists() and not Path(model).exists():
        print(f"{prog}: error: no model at {model}: run `make run` first (it trains one)", file=sys.stderr)
        sys.exit(EXIT_USAGE)

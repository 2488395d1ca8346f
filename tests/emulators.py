"""Session-wide emulator fixtures (beam_app.local.stack): each emulator starts
once, on free ports, for every test that asks for it, and stops at the end."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from beam_app.bigquery.client import table_exists
from beam_app.local.stack import BigQueryEmulator, PubSubEmulator

PROJECT = "test-project"


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[PubSubEmulator]:
    """The Pub/Sub emulator, with PUBSUB_EMULATOR_HOST (and NO_GCE_CHECK) set for the session."""
    with PubSubEmulator() as emulator:
        previous = {name: os.environ.get(name) for name in emulator.env}
        os.environ.update(emulator.env)
        try:
            yield emulator
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="session")
def bigquery_emulator() -> Iterator[BigQueryEmulator]:
    """local-bigquery serving project "test-project"; clients reach it through its `.endpoint`."""
    with BigQueryEmulator(PROJECT) as emulator:
        yield emulator


def wait_until(condition: Callable[[], Any], deadline_s: float, what: str,
               check: Callable[[], None] = lambda: None) -> Any:
    """Polls `condition` each second until it returns something truthy (returned);
    `check` raises if what is being waited on has failed (a job that died)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        check()
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")


def tables_exist(client, dataset: str) -> bool:
    """Both tables of the streaming job in `dataset` of the test project."""
    return all(table_exists(client, f"{PROJECT}:{dataset}.{table}") for table in ("predictions", "dead_letters"))


class StreamingJob:
    """beam_app.streaming.run(argv) in a thread of the test process: `check()`
    raises what the job raised (a dead job must not look alive), `stop()` asks
    it to stop and waits for it (its own stop is bounded: a few seconds)."""

    def __init__(self, argv: list[str]):
        self.stop_event, self.failed, self.summary = threading.Event(), [], {}
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()

    def _run(self, argv: list[str]) -> None:
        from beam_app import streaming

        try:
            self.summary.update(streaming.run(argv, stop=self.stop_event))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            self.failed.append(err)

    def check(self) -> None:
        if self.failed:
            raise self.failed[0]

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        self.check()
        assert not self.thread.is_alive()

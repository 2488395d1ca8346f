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
from beam_app.local.stack import BigQueryEmulator, BigtableEmulator, PubSubEmulator

PROJECT = "test-project"


@pytest.fixture(scope="session")
def _pubsub_process() -> Iterator[PubSubEmulator]:
    """The Pub/Sub emulator process: started once per session (per xdist worker), on free ports."""
    with PubSubEmulator() as emulator:
        yield emulator


@pytest.fixture
def pubsub_emulator(_pubsub_process, monkeypatch) -> PubSubEmulator:
    """The session's Pub/Sub emulator, with PUBSUB_EMULATOR_HOST (and NO_GCE_CHECK) set for this
    test only: a test that does not ask for it does not reach it by accident."""
    _pubsub_process.check_running()
    for name, value in _pubsub_process.env.items():
        monkeypatch.setenv(name, value)
    return _pubsub_process


@pytest.fixture(scope="session")
def _bigtable_process() -> Iterator[BigtableEmulator]:
    """The Bigtable emulator process: started once per session (per xdist worker), on a free port."""
    with BigtableEmulator() as emulator:
        yield emulator


@pytest.fixture
def bigtable_emulator(_bigtable_process, monkeypatch) -> BigtableEmulator:
    """The session's Bigtable emulator, with BIGTABLE_EMULATOR_HOST set for this test only."""
    _bigtable_process.check_running()
    for name, value in _bigtable_process.env.items():
        monkeypatch.setenv(name, value)
    return _bigtable_process


@pytest.fixture(scope="session")
def bigquery_emulator() -> Iterator[BigQueryEmulator]:
    """local-bigquery serving project "test-project"; clients reach it through its `.endpoint`."""
    with BigQueryEmulator(PROJECT) as emulator:
        yield emulator


def deadline_scale() -> float:
    """How much longer than on an idle machine a wait may take: TEST_DEADLINE_SCALE (default 1)
    times the load per core when it is above 1 (pytest-xdist's workers, another job on the cores)."""
    scale = float(os.environ.get("TEST_DEADLINE_SCALE", "1"))
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 1.0
    return scale * max(1.0, load)


def wait_until(condition: Callable[[], Any], deadline_s: float, what: str,
               check: Callable[[], None] = lambda: None, progress: Callable[[], Any] | None = None) -> Any:
    """Polls `condition` each second until it returns something truthy (returned);
    `check` raises if what is being waited on has failed (a job that died).

    It fails after `deadline_s` (scaled by `deadline_scale()`) without progress: with
    `progress` (a value that changes as the work advances, such as the rows written so
    far), the time counts from its last change, so a slow machine that is still moving
    does not fail; without it, from the start."""
    limit = deadline_s * deadline_scale()
    started = last_change = time.monotonic()
    seen = progress() if progress else None
    while True:
        check()
        value = condition()
        if value:
            return value
        if progress is not None and (now := progress()) != seen:
            seen, last_change = now, time.monotonic()
        if time.monotonic() - last_change > limit:
            waited = time.monotonic() - started
            stalled = f"no progress (last: {seen!r}) for {limit:.0f} s, " if progress is not None else ""
            raise AssertionError(f"timed out waiting for {what}: {stalled}{waited:.0f} s in all")
        time.sleep(1)


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

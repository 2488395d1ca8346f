"""Streaming feature state that ends: a key's state is cleared once the
watermark passes its newest event plus the horizon (the longest window plus
the allowed lateness), and a key that comes back afterwards answers as batch
does."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp

from transforms import counters, kept_histories
from transforms.events import Event
from transforms.spec import load_spec
from transforms.windowed_features import WindowedFeatures

MIN_US = 60_000_000
LATENESS_S = 600
SPEC = load_spec(Path(__file__).resolve().parents[1] / "bench" / "specs" / "churn.yaml")  # clicks per user, 1 h
HORIZON_US = (3600 + LATENESS_S) * 1_000_000


def _click(user: str, time_us: int, amount: float = 1.0) -> Event:
    return Event(f"c-{user}-{time_us}", "click", time_us, {"user": user, "amount": amount})


def _request(event_id: str, user: str, time_us: int) -> Event:
    return Event(event_id, "request", time_us, {"user": user, "y": 0.0})


def _stamped(events):
    return [beam.window.TimestampedValue(e, Timestamp(micros=e.time_us)) for e in events]


USERS = [f"u{n}" for n in range(10_000)]


@pytest.mark.slow
def test_ten_thousand_keys_seen_once_leave_no_state_on_the_fnapi_runner(monkeypatch):
    """On the FnApiRunner, whose counters are exact and whose watermark passes every
    timer once the input is read; its state cache off, as on Dataflow (with it on, Beam's
    weighing of every cached value takes most of the time: docs/architecture.md)."""
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    monkeypatch.setattr(worker_handlers, "STATE_CACHE_SIZE_MB", 0)
    events = [_click(user, n * 1_000_000) for n, user in enumerate(USERS)]
    pipeline = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([]))
    source = pipeline | beam.Create(_stamped(events))
    source.is_bounded = False  # the streaming branch: state and event-time timers
    _ = source | WindowedFeatures(SPEC, LATENESS_S, key_shards=None, release_step_ms=1000)
    result = pipeline.run()
    result.wait_until_finish()
    counts = {f"{c.key.metric.namespace}/{c.key.metric.name}": c.committed
              for c in result.metrics().query()["counters"]}
    assert counters.STATE_CLEARED.of(counts) == len(USERS)  # every key value's state ended
    assert counters.LIVE_KEYS.of(counts) == 0  # up 10,000 as they came, down 10,000 as they ended


@pytest.mark.slow
@pytest.mark.parametrize("key_shards", [None, 16], ids=["a_state_per_key", "sixteen_shards"])
def test_ten_thousand_keys_seen_once_leave_no_state_on_the_test_stream(key_shards):
    """On the streaming DirectRunner's TestStream: the watermark passes the events, then
    the horizon. Counted into the job's tally (the runner's own counters miss increments)."""
    import uuid

    tally = uuid.uuid4().hex
    events = [_click(user, n * 1_000) for n, user in enumerate(USERS)]
    last_us = events[-1].time_us
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    stream = (TestStream().add_elements(_stamped(events))
              .advance_watermark_to(Timestamp(micros=last_us + 2_000_000))  # every event released
              .advance_watermark_to(Timestamp(micros=last_us + HORIZON_US + 2_000_000))  # past the horizon
              .advance_watermark_to_infinity())
    with TestPipeline(options=options) as pipeline:
        _ = pipeline | stream | WindowedFeatures(SPEC, LATENESS_S, key_shards=key_shards, release_step_ms=1000,
                                                 tally=tally)
    counts = counters.tallied(tally)
    assert counters.STATE_CLEARED.of(counts) == len(USERS)
    assert counters.LIVE_KEYS.of(counts) == 0


_FOUND: list = []


def _found(row) -> None:
    """A module function, pickled by reference: the DirectRunner runs it in this process."""
    _FOUND.append((row.event.event_id, *row.features))


def test_a_key_that_comes_back_after_its_state_ended_answers_as_batch_does(monkeypatch):
    dropped = []
    drop = kept_histories.KEPT.drop
    monkeypatch.setattr(kept_histories.KEPT, "drop", lambda key: (dropped.append(key[1]), drop(key)))
    first = [_click("back", 0, 4.0), _click("back", 10 * MIN_US, 6.0), _click("stays", 0, 1.0),
             _request("r-early", "back", 20 * MIN_US)]
    later = 20 * MIN_US + HORIZON_US + 5 * MIN_US  # after the state of both users has ended
    second = [_click("back", later, 9.0), _request("r-back", "back", later + MIN_US),
              _request("r-gone", "stays", later + MIN_US)]
    expected = [("r-early", 2.0, 5.0),  # both clicks in [t - 1h, t)
                ("r-back", 1.0, 9.0),  # only the click after its return: the window holds nothing older
                ("r-gone", 0.0, None)]  # an empty window, as batch gives
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    stream = (TestStream().add_elements(_stamped(first)).advance_watermark_to(Timestamp(micros=later - MIN_US))
              .add_elements(_stamped(second)).advance_watermark_to_infinity())
    _FOUND.clear()
    with TestPipeline(options=options) as pipeline:
        _ = (pipeline | stream
             | WindowedFeatures(SPEC, LATENESS_S, key_shards=None, release_step_ms=1000)
             | beam.Map(_found))  # not assert_that: in streaming it saw the first pane only
    assert sorted(_FOUND, key=str) == sorted(expected, key=str)
    with TestPipeline() as pipeline:  # the batch path over the same events
        rows = (pipeline | beam.Create(first + second) | WindowedFeatures(SPEC, LATENESS_S)
                | beam.Map(lambda row: (row.event.event_id, *row.features)))
        assert_that(rows, equal_to(expected))
    assert {"0/back", "0/stays"} <= set(dropped), dropped  # both ended before "back" came back

"""At most once per (event_id, role): the pure ledger by hand and by property,
then the batch and streaming paths of DeduplicateEvents, and the features of a
stream delivered twice equal the batch features of the clean events."""

from __future__ import annotations

import json
import random

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_app.common.job_report import counters as job_counters
from tests.conftest import HOUR_US, MIN_US, observation, request
from transforms import counters
from transforms.deduplicate import CONFLICT, DUPLICATE, NEW, STAGE, DeduplicateEvents, IdLedger, resolve_copies
from transforms.events import event_to_json

HORIZON_US = 4 * HOUR_US


def test_ledger_admits_once_drops_identical_copies_and_names_both_versions_of_a_conflict():
    ledger = IdLedger(HORIZON_US)
    first = observation("f1", 10 * MIN_US, 5.0)
    assert ledger.admit(first) == (NEW, None)
    assert ledger.admit(observation("f1", 10 * MIN_US, 5.0)) == (DUPLICATE, None)
    # Same id, other role: another event.
    assert ledger.admit(request("f1", 10 * MIN_US)) == (NEW, None)
    verdict, reason = ledger.admit(observation("f1", 10 * MIN_US, 7.0))
    assert verdict == CONFLICT
    assert reason.startswith("conflicting duplicate: observation f1 was already accepted with other content "
                             "(dep_delay 5.0 (kept) vs 7.0 (this copy)); kept: ")
    assert json.loads(reason.split("kept: ", 2)[-1]) == json.loads(event_to_json(first))
    _, moved = ledger.admit(observation("f1", 11 * MIN_US, 5.0))
    assert "event_time 1970-01-01T00:10:00Z (kept) vs 1970-01-01T00:11:00Z (this copy)" in moved


def test_ledger_forgets_an_identity_with_the_history_it_belongs_to():
    ledger = IdLedger(HORIZON_US)
    ledger.admit(observation("old", 0, 1.0))
    ledger.admit(observation("new", HOUR_US, 1.0))
    assert ledger.next_forget_us() == HORIZON_US
    ledger.forget_through(HORIZON_US)
    assert set(ledger.entries) == {"new/observation"}
    assert ledger.admit(observation("old", 0, 1.0)) == (NEW, None)  # past the horizon: a new event again


_COPY = st.builds(lambda delay, minute: observation("x", minute * MIN_US, delay),
                  st.sampled_from([1.0, 2.0, 3.0]), st.integers(0, 2))


@settings(max_examples=200, deadline=None)
@given(st.lists(_COPY, min_size=1, max_size=8), st.randoms())
def test_batch_keeps_the_same_copy_whatever_the_order_and_accounts_for_every_copy(copies, rng):
    kept, duplicates, conflicts = resolve_copies(copies)
    shuffled = list(copies)
    rng.shuffle(shuffled)
    assert resolve_copies(shuffled)[0] == kept
    assert kept == min(copies, key=event_to_json)
    assert 1 + duplicates + len(conflicts) == len(copies)
    assert duplicates == sum(copy == kept for copy in copies) - 1
    assert all(copy != kept and reason.startswith("conflicting duplicate") for copy, reason in conflicts)


def test_batch_path_collapses_copies_and_dead_letters_conflicts():
    events = [observation("o1", 0, 5.0), observation("o1", 0, 5.0), observation("o1", 0, 9.0),
              request("r1", MIN_US), request("r1", MIN_US), observation("o2", 0, 1.0)]
    with TestPipeline() as pipeline:
        out = pipeline | beam.Create(events) | DeduplicateEvents(horizon_s=0)
        assert_that(out["events"] | beam.Map(lambda e: (e.event_id, e.role, e.fields.get("dep_delay"))),
                    equal_to([("o1", "observation", 5.0), ("r1", "request", None), ("o2", "observation", 1.0)]),
                    label="kept")
        assert_that(out[STAGE] | beam.Map(lambda d: (d.source, d.stage, json.loads(d.raw)["dep_delay"])),
                    equal_to([("event:o1/observation", "duplicate", 9.0)]), label="conflicts")
    counts = job_counters(pipeline.result)
    assert counters.duplicates("observation").of(counts) == 1 and counters.duplicates("request").of(counts) == 1
    assert counters.conflicts("observation").of(counts) == 1


def _stamped(events):
    return [beam.window.TimestampedValue(e, Timestamp(micros=e.time_us)) for e in events]


def _streaming_options():
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    return options


@pytest.mark.parametrize("key_shards", [None, 1], ids=["ledger_per_identity", "one_shard"])
def test_streaming_path_keeps_the_first_copy_even_when_a_copy_comes_late(key_shards):
    stream = (TestStream()
              .add_elements(_stamped([observation("o1", 0, 5.0), request("r1", MIN_US), observation("o1", 0, 5.0)]))
              .advance_watermark_to(Timestamp(micros=30 * MIN_US))
              # After the watermark passed them: a redelivered request, an identical and a conflicting copy.
              .add_elements(_stamped([request("r1", MIN_US), observation("o1", 0, 5.0), observation("o1", 0, 8.0)]))
              .advance_watermark_to(Timestamp(micros=HOUR_US))
              .advance_watermark_to_infinity())
    with TestPipeline(options=_streaming_options()) as pipeline:
        out = pipeline | stream | DeduplicateEvents(4 * 3600, key_shards=key_shards)
        assert_that(out["events"] | beam.Map(lambda e: (e.event_id, e.role, e.fields.get("dep_delay"))),
                    equal_to([("o1", "observation", 5.0), ("r1", "request", None)]), label="kept")
        assert_that(out[STAGE] | beam.Map(lambda d: json.loads(d.raw)["dep_delay"]), equal_to([8.0]),
                    label="conflicts")


def test_streaming_ledger_forgets_an_identity_once_the_watermark_passes_its_horizon():
    """A copy within the horizon is a duplicate; once the watermark has passed the event's time plus the
    horizon, the ledger has forgotten it (its state is gone), and a copy then is a new event: bounded state."""
    stream = (TestStream()
              .add_elements(_stamped([observation("o1", 0, 5.0)]))
              .advance_watermark_to(Timestamp(micros=30 * MIN_US))
              .add_elements(_stamped([observation("o1", 0, 5.0)]))  # within the 1 h horizon: a duplicate
              .advance_watermark_to(Timestamp(micros=2 * HOUR_US))
              .add_elements(_stamped([observation("o1", 0, 5.0)]))  # past it: forgotten
              .advance_watermark_to_infinity())
    with TestPipeline(options=_streaming_options()) as pipeline:
        out = pipeline | stream | DeduplicateEvents(3600, key_shards=1)
        assert_that(out["events"] | beam.Map(lambda e: e.event_id), equal_to(["o1", "o1"]))


def _features(rows):
    return rows | beam.Map(lambda row: (row.event.event_id, row.features))


@pytest.mark.slow
def test_features_of_a_stream_delivered_twice_equal_batch_features_of_the_clean_events(flights_spec, tmp_path):
    """Every event of a busy morning delivered twice, the second copy at a random later moment (some after
    the watermark passed the event): the streaming features equal the batch features of the events once."""
    from tests.flights_slice import flights_lines, slice_events
    from tests.test_windowed_features import _AppendLines, _read_features
    from transforms.windowed_features import WindowedFeatures

    day = slice_events(flights_spec, flights_lines(lambda month, day: (month, day) == (3, 4)))
    start = min(e.time_us for e in day) + 10 * HOUR_US
    events = sorted((e for e in day if start <= e.time_us < start + 3 * HOUR_US), key=lambda e: e.time_us)
    rng = random.Random(11)
    arrivals = sorted([(e.time_us, e) for e in events] +
                      [(e.time_us + rng.randrange(0, 40 * 60_000) * 1000, e) for e in events], key=lambda pair: pair[0])
    stream = TestStream()
    for index in range(0, len(arrivals), 30):
        part = arrivals[index:index + 30]
        stream.add_elements(_stamped([e for _, e in part]))
        stream.advance_watermark_to(Timestamp(micros=part[-1][0]))
    stream.advance_watermark_to(Timestamp(micros=arrivals[-1][0] + 24 * HOUR_US)).advance_watermark_to_infinity()

    with TestPipeline() as pipeline:
        (_features(pipeline | beam.Create(events) | WindowedFeatures(flights_spec))
         | "ToJson" >> beam.Map(json.dumps) | beam.ParDo(_AppendLines(tmp_path / "batch")))
    with TestPipeline(options=_streaming_options()) as pipeline:
        unique = pipeline | stream | DeduplicateEvents(flights_spec.max_window_s + 3600, key_shards=1)
        (_features(unique["events"] | WindowedFeatures(flights_spec, key_shards=1, release_step_ms=1000))
         | "ToJson" >> beam.Map(json.dumps) | beam.ParDo(_AppendLines(tmp_path / "streaming")))

    batch, streaming = _read_features(tmp_path, "batch"), _read_features(tmp_path, "streaming")
    assert len(batch) == sum(e.role == "request" for e in events) > 100
    lines = (tmp_path / "streaming").read_text().splitlines()
    assert len(lines) == len(streaming)  # one row per request: the second copies changed nothing
    assert streaming == batch  # == on floats: bit-identical

"""WindowedFeatures as a composite: hand-computed values on the batch path, and
parity of the streaming path (TestStream, controlled watermark) with batch."""

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

from tests.conftest import HOUR_US, MIN_US, observation, request
from tests.flights_slice import flights_lines, slice_events
from transforms.windowed_features import WindowedFeatures

DAY_US = 24 * HOUR_US
MIDNIGHT = 15_706 * DAY_US  # 2013-01-01T00:00Z: a bucket boundary of the batch path


def _features(rows):
    return rows | "Features" >> beam.Map(lambda row: (row.event.event_id, row.features))


def test_hand_computed_values_across_keys_and_buckets(flights_spec):
    events = [
        observation("o1", MIDNIGHT - 50 * MIN_US, 30.0, tailnum="N1"),       # yesterday's bucket, EWR/UA to ORD
        observation("o2", MIDNIGHT - 20 * MIN_US, 10.0, carrier="AA"),       # EWR/AA to ORD, no tail number
        observation("o3", MIDNIGHT + 10 * MIN_US, -5.0, origin="JFK", dest="BOS", tailnum="N1"),  # JFK/UA
        # a tie on time with o3 on the same tail: o5, the larger id, is the later
        observation("o5", MIDNIGHT + 10 * MIN_US, 7.0, origin="LGA", carrier="DL", dest="MIA", tailnum="N1"),
        request("r1", MIDNIGHT + 30 * MIN_US, tailnum="N1"),                 # EWR/UA to ORD
        observation("o4", MIDNIGHT + 30 * MIN_US, 99.0, tailnum="N1"),       # at r1's time: not seen by r1
        request("r2", MIDNIGHT + 4 * HOUR_US, origin="JFK", dest="BOS"),     # no tail number
        request("r3", MIDNIGHT - 20 * MIN_US, origin="LGA", carrier="AA", tailnum="N1"),  # o2 is at its t
    ]
    with TestPipeline() as pipeline:
        rows = pipeline | beam.Create(events) | WindowedFeatures(flights_spec)
        # Spec order: origin count 1h, mean 1h, max 1h, mean 3h; carrier mean 3h; tail number last, seconds
        # since, last 3; route mean 24h; dest mean 3h; origin stddev 3h.
        assert_that(_features(rows), equal_to([
            # r1 at 00:30. EWR 1h [23:30, 00:30): o1 (23:10) is out, o2 in; 3h: o1 and o2 (mean 20, stddev 10);
            # UA 3h: o1 and o3 (12.5). N1 24h by (time, id): o1, o3, o5 (o2 has no tail number): last o5 = 7
            # at 00:10, 1200 s ago; last 3 (o5, o3, o1). Route EWR-ORD 24h: o1, o2 (20); dest ORD 3h: o1, o2.
            ("r1", (1.0, 10.0, 10.0, 20.0, 12.5, 7.0, 1200.0, (7.0, -5.0, 30.0), 20.0, 20.0, 10.0)),
            # r2 at 04:00: JFK windows empty; UA 3h [01:00, 04:00) empty; no tail number: missing; route
            # JFK-BOS 24h: o3 (-5); dest BOS 3h: o3 at 00:10 is out.
            ("r2", (0.0, None, None, None, None, None, None, None, -5.0, None, None)),
            # r3 at 23:40 the day before: LGA empty; AA 3h: o2 is at its t; N1 24h: o1 (30, 1800 s ago);
            # route LGA-ORD: nothing; dest ORD 3h [20:40, 23:40): o1.
            ("r3", (0.0, None, None, None, None, 30.0, 1800.0, (30.0,), None, 30.0, None)),
        ]))


def _slice_events(spec, days):
    return slice_events(spec, flights_lines(lambda month, day: (month, day) in days))


# Streams end with the watermark at a finite time well past the last event,
# then at infinity. The DirectRunner does not hold a stage's output watermark
# for its pending timers, so output released at the very jump to infinity
# would reach the join after its global window closed; Dataflow holds them.
CLOSE_AFTER_US = 24 * HOUR_US


def _arrivals(events, seed=7, chunk=40):
    """Events in roughly event-time order (shuffled within chunks), with the
    watermark after each chunk at the earliest event still to come: nothing late."""
    ordered = sorted(events, key=lambda e: e.time_us)
    chunks = [ordered[i:i + chunk] for i in range(0, len(ordered), chunk)]
    rng = random.Random(seed)
    stream = TestStream()
    for index, part in enumerate(chunks):
        rng.shuffle(part)
        stream.add_elements([beam.window.TimestampedValue(e, Timestamp(micros=e.time_us)) for e in part])
        if index + 1 < len(chunks):
            stream.advance_watermark_to(Timestamp(micros=chunks[index + 1][0].time_us))
    stream.advance_watermark_to(Timestamp(micros=ordered[-1].time_us + CLOSE_AFTER_US))
    return stream.advance_watermark_to_infinity()


class _AppendLines(beam.DoFn):
    """A file sink that also works on unbounded input (WriteToText needs windows
    there); one O_APPEND write per line keeps concurrent bundles apart."""

    def __init__(self, path):
        self._path = str(path)

    def process(self, line):
        with open(self._path, "a") as out:
            out.write(line + "\n")


def _run_to_file(pipeline, events_source, spec, path, key_shards=None, release_step_ms=0):
    (_features(pipeline | events_source | WindowedFeatures(spec, key_shards=key_shards,
                                                          release_step_ms=release_step_ms))
     | beam.Map(json.dumps) | beam.ParDo(_AppendLines(path)))


def _read_features(directory, prefix):
    rows = [json.loads(line) for path in directory.glob(f"{prefix}*") for line in path.read_text().splitlines()]
    return {event_id: tuple(features) for event_id, features in rows}


@pytest.mark.slow
@pytest.mark.parametrize("key_shards, release_step_ms", [(None, 0), (1, 0), (2, 600_000)],
                         ids=["state_per_key", "one_shard", "two_shards_10min_steps"])
def test_streaming_path_equals_batch_path_bit_for_bit(flights_spec, tmp_path, key_shards, release_step_ms):
    # Six busy hours of real flights: every key sees many events, with ties.
    day = _slice_events(flights_spec, {(3, 4)})
    start = min(e.time_us for e in day) + 10 * HOUR_US
    events = [e for e in day if start <= e.time_us < start + 6 * HOUR_US]
    assert len(events) > 500

    with TestPipeline() as pipeline:
        _run_to_file(pipeline, beam.Create(events), flights_spec, tmp_path / "batch")
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as pipeline:
        _run_to_file(pipeline, _arrivals(events), flights_spec, tmp_path / "streaming", key_shards,
                     release_step_ms)

    batch = _read_features(tmp_path, "batch")
    streaming = _read_features(tmp_path, "streaming")
    assert len(batch) == sum(e.role == "request" for e in events)
    assert any(f[1] is not None for f in batch.values()) and any(f[1] is None for f in batch.values())
    differ = {k: (batch.get(k), streaming.get(k)) for k in batch.keys() | streaming.keys()
              if batch.get(k) != streaming.get(k)}  # == on floats: bit-identical
    assert not differ, f"{len(differ)} requests differ, e.g. {list(differ.items())[:3]}"


@pytest.mark.slow
def test_late_observation_is_used_by_later_requests(flights_spec):
    # The streaming DirectRunner reports no user metrics (Beam 2.77), so the
    # late count itself is checked on KeyHistory.apply (test_point_in_time.py).
    stream = (TestStream()
              .add_elements([beam.window.TimestampedValue(e, Timestamp(micros=e.time_us)) for e in (
                  observation("o1", 0, 10.0), request("r1", 30 * MIN_US))])
              .advance_watermark_to(Timestamp(micros=40 * MIN_US))
              .add_elements([beam.window.TimestampedValue(e, Timestamp(micros=e.time_us)) for e in (
                  observation("late", 20 * MIN_US, 30.0), request("r2", 50 * MIN_US))])
              .advance_watermark_to(Timestamp(micros=CLOSE_AFTER_US))
              .advance_watermark_to_infinity())
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as pipeline:
        rows = pipeline | stream | WindowedFeatures(flights_spec)
        assert_that(_features(rows), equal_to([
            # route EWR-ORD and dest ORD: o1 too; one value: stddev 0; no tail number: missing
            ("r1", (1.0, 10.0, 10.0, 10.0, 10.0, None, None, None, 10.0, 10.0, 0.0)),
            # the late one counts for r2: {10, 30}: mean 20, stddev 10
            ("r2", (2.0, 20.0, 30.0, 20.0, 20.0, None, None, None, 20.0, 20.0, 10.0)),
        ]))


@pytest.mark.parametrize("join_key", ["r1", "shard-0"], ids=["per_event_id", "one_shard"])
def test_join_waits_for_every_group_even_when_a_part_is_redelivered(flights_spec, join_key):
    from transforms.feature_layout import EventLayout, feature_groups
    from transforms.unbounded_features import REQUEST_PART, _JoinGroupsDoFn

    groups = feature_groups(flights_spec)  # origin, carrier, tailnum, origin_dest, dest
    item = EventLayout.of(flights_spec).to_item(request("r1", 30 * MIN_US), (None,) * 11)
    # No tail number: the request waits for origin (0), carrier (1), route (3) and dest (4), not tailnum (2).
    parts = [("r1", (REQUEST_PART, item)), ("r1", (REQUEST_PART, item)),  # the request twice
             ("r1", (0, (1.0, 10.0, 10.0, 10.0, 0.0))), ("r1", (0, (1.0, 10.0, 10.0, 10.0, 0.0))),  # origin twice
             ("r1", (1, (20.0,))), ("r1", (3, (15.0,))), ("r1", (4, (12.0,)))]
    parts = [(join_key, (event_id, part)) for event_id, part in parts]
    with TestPipeline() as pipeline:
        joined = (pipeline
                  | beam.Create(parts).with_output_types(tuple[str, tuple])
                  | beam.ParDo(_JoinGroupsDoFn(groups))
                  | beam.Map(lambda joined: (joined[0], joined[-1])))
        assert_that(joined, equal_to([("r1", (1.0, 10.0, 10.0, 10.0, 20.0, None, None, None, 15.0, 12.0, 0.0))]))




def test_take_joined_leaves_the_other_requests_of_a_shard_pending(flights_spec):
    from transforms.feature_layout import EventLayout, feature_groups
    from transforms.unbounded_features import REQUEST_PART, take_joined

    groups = feature_groups(flights_spec)
    layout = EventLayout.of(flights_spec)
    r1, r2 = (layout.to_item(request(event_id, 30 * MIN_US), (None,) * 11) for event_id in ("r1", "r2"))
    answers = [(0, (1.0, 10.0, 10.0, 10.0, 0.0)), (1, (20.0,)), (3, (15.0,)), (4, (12.0,))]
    pending = [("r1", (REQUEST_PART, r1)), ("r2", (REQUEST_PART, r2)), *(("r2", part) for part in answers[:2]),
               *(("r1", part) for part in answers)]
    joined, rest = take_joined(pending, "r1", groups)
    assert joined[-1] == (1.0, 10.0, 10.0, 10.0, 20.0, None, None, None, 15.0, 12.0, 0.0)
    assert rest == [("r2", (REQUEST_PART, r2)), *(("r2", part) for part in answers[:2])]
    assert take_joined(rest, "r2", groups) == (None, rest)  # r2 still waits for the route and dest parts


_FOUND: dict[str, list] = {}  # what an in-process runner's last step saw, by test


def _found(row, test: str) -> None:
    """A module function, pickled by reference: the FnApiRunner runs it in this process."""
    _FOUND[test].append((row.event.event_id, row.features[0]))  # origin_departures_1h


def test_event_times_with_microseconds_end_on_the_fnapi_runner(flights_spec, monkeypatch):
    """Timers fire at whole milliseconds (Beam's portable timers, as on Dataflow): a timer
    set at an event's own microsecond once fired before it, found nothing due and was set
    again, forever. Here every event has microseconds, nothing is stepped (release_step_ms 0),
    and the run ends with the values counted by hand: the ledger and the releases fire at
    the millisecond after their times."""
    import threading

    from apache_beam.runners.portability.fn_api_runner import FnApiRunner, worker_handlers

    from transforms.deduplicate import DeduplicateEvents

    monkeypatch.setattr(worker_handlers, "STATE_CACHE_SIZE_MB", 0)  # as on Dataflow

    t0 = 1_357_000_000_000_000 + 123  # a whole second plus 123 µs
    events = [observation(f"o{n}", t0 + n * 1_001, float(n)) for n in range(5)]
    events += [request("r", t0 + 5_005 + 7), request("r0", t0 + 499)]  # r sees all five, r0 the first
    found = _FOUND.setdefault("microseconds", [])
    pipeline = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([]))
    source = pipeline | beam.Create([beam.window.TimestampedValue(e, Timestamp(micros=e.time_us)) for e in events])
    source.is_bounded = False  # the streaming branches: state and event-time timers
    unique = source | DeduplicateEvents(flights_spec.max_window_s + 3600)
    rows = unique["events"] | WindowedFeatures(flights_spec, 3600, None, release_step_ms=0)
    rows | beam.Map(_found, "microseconds")
    done = threading.Event()
    runner = threading.Thread(target=lambda: (pipeline.run().wait_until_finish(), done.set()), daemon=True)
    runner.start()
    assert done.wait(120), "the stream's timers never settled"
    assert sorted(found) == [("r", 5.0), ("r0", 1.0)]

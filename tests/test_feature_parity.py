"""Parity of every aggregate between the bounded (batch) and the unbounded
(streaming, TestStream) paths, bit for bit, on a spec made to exercise the
whole feature language: every aggregate, a composite key, an optional key,
two kinds of observation, with ties on time, duplicate deliveries and
observations arriving behind the watermark.

Both paths see the same events through `DeduplicateEvents`, as the jobs do.
A late observation (behind the watermark) still joins the history; this
stream delivers each one before any request that can see it is released
(every request is later than the watermark it arrives behind), so the two
paths must agree exactly, and the late ones must actually be late."""

from __future__ import annotations

import json
import random

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.utils.timestamp import Timestamp

from transforms import history_log, kept_histories, unbounded_features
from transforms.deduplicate import DeduplicateEvents
from transforms.events import Event
from transforms.point_in_time import AGGREGATE_FUNCTIONS
from transforms.spec import spec_from_dict
from transforms.windowed_features import WindowedFeatures

MIN_US = 60_000_000
STEP_US = 20 * MIN_US  # the watermark advances a step at a time
GAP_US = 3 * MIN_US  # no request in the last minutes of a step: where late observations go

SPEC = spec_from_dict({
    "name": "parity",
    "request": {"fields": {"shop": {"type": "string"}, "item": {"type": "string", "required": False},
                           "region": {"type": "string"}},
                "label": {"name": "y", "type": "float"}},
    "observations": {
        "sale": {"fields": {"shop": {"type": "string"}, "item": {"type": "string", "required": False},
                            "amount": {"type": "float"}, "units": {"type": "float", "required": False},
                            "customer": {"type": "string"}}},
        "visit": {"fields": {"region": {"type": "string"}, "minutes": {"type": "float"}}},
    },
    "windowed_features": [
        {"name": "sales_1h", "kind": "sale", "key": "shop", "aggregate": "count", "window": "1h"},
        {"name": "amount_sum_1h", "kind": "sale", "key": "shop", "aggregate": "sum", "field": "amount",
         "window": "1h"},
        {"name": "amount_mean_1h", "kind": "sale", "key": "shop", "aggregate": "mean", "field": "amount",
         "window": "1h"},
        {"name": "amount_min_1h", "kind": "sale", "key": "shop", "aggregate": "min", "field": "amount",
         "window": "1h"},
        {"name": "amount_max_1h", "kind": "sale", "key": "shop", "aggregate": "max", "field": "amount",
         "window": "1h"},
        {"name": "amount_per_unit_2h", "kind": "sale", "key": "shop", "aggregate": "ratio", "field": "amount",
         "per": "units", "window": "2h"},
        {"name": "amount_std_2h", "kind": "sale", "key": "shop", "aggregate": "stddev", "field": "amount",
         "window": "2h"},
        {"name": "amount_last_2h", "kind": "sale", "key": "shop", "aggregate": "last", "field": "amount",
         "window": "2h"},
        {"name": "since_sale_2h", "kind": "sale", "key": "shop", "aggregate": "time_since_last", "window": "2h"},
        {"name": "since_units_2h", "kind": "sale", "key": "shop", "aggregate": "time_since_last", "field": "units",
         "window": "2h"},
        {"name": "amount_last3_2h", "kind": "sale", "key": "shop", "aggregate": "last_k", "field": "amount",
         "k": 3, "window": "2h"},
        {"name": "customers_2h", "kind": "sale", "key": "shop", "aggregate": "count_distinct", "field": "customer",
         "window": "2h"},
        {"name": "item_amount_mean_2h", "kind": "sale", "key": ["shop", "item"], "aggregate": "mean",
         "field": "amount", "window": "2h"},
        {"name": "item_sales_2h", "kind": "sale", "key": ["shop", "item"], "aggregate": "count", "window": "2h"},
        {"name": "visits_30m", "kind": "visit", "key": "region", "aggregate": "count", "window": "30m"},
        {"name": "visit_minutes_last_1h", "kind": "visit", "key": "region", "aggregate": "last",
         "field": "minutes", "window": "1h"},
    ],
    "split": {"method": "hash"},
})


def test_the_spec_exercises_every_aggregate():
    assert {f.aggregate for f in SPEC.windowed_features} == set(AGGREGATE_FUNCTIONS)
    assert any(len(f.key) > 1 for f in SPEC.windowed_features)
    assert any(f.key_optional for f in SPEC.windowed_features) and len(SPEC.kinds) == 2


def _events(seed: int, steps: int = 12):
    """(events in arrival order with watermark steps, late observations): a
    shuffled stream of requests and both kinds, on whole minutes (ties),
    with about one event in ten delivered twice."""
    rng = random.Random(seed)
    shops, items, regions = ("s1", "s2", "s3"), ("i1", "i2", None), ("north", "south")
    steps_of_events, late = [], []
    for step in range(steps):
        start = step * STEP_US
        events = []
        for n in range(rng.randint(15, 30)):
            minute = rng.randrange(0, (STEP_US - GAP_US) // MIN_US)
            t = start + minute * MIN_US
            kind = rng.choice(("request", "sale", "sale", "visit"))
            event_id = f"e{step:02d}-{n:02d}"
            if kind == "request":
                events.append(Event(event_id, "request", t, {"shop": rng.choice(shops), "item": rng.choice(items),
                                                             "region": rng.choice(regions), "y": 1.0}))
            elif kind == "sale":
                events.append(Event(event_id, "sale", t, {
                    "shop": rng.choice(shops), "item": rng.choice(items), "amount": float(rng.randint(-5, 40)) / 4,
                    "units": rng.choice((None, 1.0, 2.0, 0.5)), "customer": rng.choice(("a", "b", "c", "d"))}))
            else:
                events.append(Event(event_id, "visit", t, {"region": rng.choice(regions),
                                                           "minutes": float(rng.randint(1, 90))}))
        events.append(Event(f"quiet{step:02d}", "request", start + MIN_US, {  # a shop that never sells: empty windows
            "shop": "quiet", "item": "i1", "region": "east", "y": 0.0}))
        events += [e for e in events if rng.random() < 0.1]  # redelivered: identical copies
        rng.shuffle(events)
        # Late: observations in the gap before this step's end, delivered after the watermark passed them.
        late.append([Event(f"late{step:02d}-{n}", "sale", start + STEP_US - GAP_US + n * MIN_US, {
            "shop": rng.choice(shops), "item": "i1", "amount": float(n + step), "units": 1.0, "customer": "z"})
            for n in range(rng.randint(0, 2))])
        steps_of_events.append(events)
    return steps_of_events, late


def _stream(steps_of_events, late):
    stream = TestStream()
    stamp = lambda events: [beam.window.TimestampedValue(e, Timestamp(micros=e.time_us)) for e in events]  # noqa
    for step, events in enumerate(steps_of_events):
        stream.add_elements(stamp(events))
        stream.advance_watermark_to(Timestamp(micros=(step + 1) * STEP_US))
        if late[step]:
            stream.add_elements(stamp(late[step]))  # behind the watermark now
    end = len(steps_of_events) * STEP_US
    return stream.advance_watermark_to(Timestamp(micros=end + 24 * 60 * MIN_US)).advance_watermark_to_infinity()


class _AppendLines(beam.DoFn):
    """A file sink for unbounded input too; one O_APPEND write per line."""

    def __init__(self, path):
        self._path = str(path)

    def process(self, line):
        with open(self._path, "a") as out:
            out.write(line + "\n")


def _features(pipeline, source, path, key_shards=None, release_step_ms=0):
    unique = pipeline | source | DeduplicateEvents(SPEC.max_window_s + 3600, key_shards=key_shards)
    (unique["events"]
     | WindowedFeatures(SPEC, key_shards=key_shards, release_step_ms=release_step_ms)
     | beam.Map(lambda row: json.dumps([row.event.event_id, row.features]))
     | beam.ParDo(_AppendLines(path)))


def _read(path):
    return {event_id: features for event_id, features in
            (json.loads(line) for line in path.read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize("seed, key_shards, release_step_ms, kept", [
    (1, None, 0, True), (2, 2, 300_000, True), (3, 2, 0, False)],
    ids=["state_per_key", "two_shards_5min_steps", "rebuilt_from_the_log_at_every_firing"])
def test_every_aggregate_streams_as_it_batches(tmp_path, monkeypatch, seed, key_shards, release_step_ms, kept):
    if not kept:  # nothing stays in memory between firings: each firing reads its history's log back
        monkeypatch.setattr(kept_histories.KEPT, "max_size", 0)
    logs_read = []  # the logs read back (through the real function; the streaming DirectRunner drops counters
    # incremented in timer callbacks, so HISTORIES_REBUILT cannot be read here)
    monkeypatch.setattr(unbounded_features, "histories_from_log", lambda features, lateness_s, entries: (
        logs_read.append(len(entries)) or history_log.histories_from_log(features, lateness_s, entries)))
    steps_of_events, late = _events(seed)
    everything = [e for events in steps_of_events for e in events] + [e for step in late for e in step]
    assert any(late)
    with TestPipeline() as pipeline:
        _features(pipeline, beam.Create(everything), tmp_path / "batch")
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as pipeline:
        _features(pipeline, _stream(steps_of_events, late), tmp_path / "streaming", key_shards, release_step_ms)
    assert any(logs_read) == (not kept), logs_read  # the log was read back exactly when nothing was kept

    batch, streaming = _read(tmp_path / "batch"), _read(tmp_path / "streaming")
    requests = {e.event_id for e in everything if e.role == "request"}
    assert batch.keys() == requests  # one row per request, duplicates de-duplicated
    differ = {k: (batch.get(k), streaming.get(k)) for k in batch.keys() | streaming.keys()
              if batch.get(k) != streaming.get(k)}  # == on floats and lists: bit-identical
    assert not differ, f"{len(differ)} of {len(batch)} requests differ, e.g. {list(differ.items())[:2]}"
    # The stream is hostile enough to mean something: empty and full windows,
    # a missing optional key, sequences with ties and late observations seen.
    names = [f.name for f in SPEC.windowed_features]
    column = {name: [features[i] for features in batch.values()] for i, name in enumerate(names)}
    assert None in column["amount_mean_1h"] and any(v not in (None, 0.0) for v in column["amount_std_2h"])
    assert None in column["item_sales_2h"] and 0.0 in column["item_sales_2h"]
    assert any(v and len(v) == 3 for v in column["amount_last3_2h"]) and [] in column["amount_last3_2h"]
    # The late observations are in the stream's answers: each request's sales_1h counted here from the
    # events (a copy once; a sale at exactly t - 1h counts, one at t does not) equals the stream's, and for
    # some requests a late sale is part of that count.
    unique = {(e.event_id, e.role): e for e in everything}.values()
    sales = [e for e in unique if e.role == "sale"]
    late_ids = {e.event_id for step in late for e in step}
    index, with_late = names.index("sales_1h"), 0
    for request in (e for e in unique if e.role == "request"):
        window = [sale for sale in sales if sale.fields["shop"] == request.fields["shop"]
                  and request.time_us - 60 * MIN_US <= sale.time_us < request.time_us]
        assert streaming[request.event_id][index] == len(window), request
        with_late += any(sale.event_id in late_ids for sale in window)
    assert with_late > 0

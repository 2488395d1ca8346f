"""`WindowedFeatures(spec)`: the one PTransform that computes every windowed
aggregate of the spec for every request event, in batch and in streaming.

The features are grouped by kind of observation and key (flights: origin,
carrier, tailnum, origin x dest, dest; with weather, weather x origin). For
each group, the events of each key value are gathered and applied in time
order to a `KeyHistory` (transforms/point_in_time.py), which answers each
request from [t - W, t). How the events are gathered depends on the input:

- bounded (batch): one GroupByKey on (group, key value, time bucket), then
  one on event_id joining each request's groups, transforms/bounded_features.py;
- unbounded (streaming): a stateful DoFn per group, released by event-time
  timers, and a join per event_id, transforms/unbounded_features.py.

Both call the same `KeyHistory.apply`, whose result depends only on event
times and ids; the TestStream parity test checks that they agree bit for bit.
The element layout they share is in transforms/feature_layout.py.
"""

from __future__ import annotations

from typing import Optional

import apache_beam as beam
from apache_beam.utils.timestamp import Timestamp

from transforms import counters
from transforms.bounded_features import BucketedFeatures
from transforms.feature_layout import TIME, EventLayout, FeatureRow, feature_groups
from transforms.gather import Batch
from transforms.spec import FeatureSpec
from transforms.unbounded_features import StreamingFeatures


class _ToRow(beam.DoFn):
    """Element -> FeatureRow at the request's event time (batch stages drop timestamps)."""

    def __init__(self, layout: EventLayout):
        self._layout = layout
        self._rows = counters.FEATURE_ROWS.metric()

    def process(self, item):
        self._rows.inc()
        yield beam.window.TimestampedValue(self._layout.to_row(item), Timestamp(micros=item[TIME]))


class _ToRows(beam.DoFn):
    """list[element] -> list[FeatureRow], or each FeatureRow at the request's event time (`flat`)."""

    def __init__(self, layout: EventLayout, flat: bool):
        self._layout, self._flat = layout, flat
        self._rows = counters.FEATURE_ROWS.metric()

    def process(self, items):
        self._rows.inc(len(items))
        to_row = self._layout.to_row
        if self._flat:
            for item in items:
                yield beam.window.TimestampedValue(to_row(item), Timestamp(micros=item[TIME]))
        else:
            yield Batch(to_row(item) for item in items)


class WindowedFeatures(beam.PTransform):
    """PCollection[Event] (requests and observations of every kind, in any
    order) -> PCollection[FeatureRow], one per request, timestamped at the
    request time.

    allowed_lateness_s: on unbounded input, how far behind the watermark a
    request may arrive and still be answered exactly (older observations
    are forgotten after the longest window plus this).
    key_shards: on unbounded input, None keeps each key value in a state of
    its own (the most parallel); N hashes key values into N states per
    group: fewer, larger states and fewer timer firings (each firing is a
    bundle through every later step, which the DirectRunner pays for).
    release_step_ms: on unbounded input, requests are answered once the
    watermark passes the end of their step of event time: at most one timer
    firing per state and step, for up to a step of added latency. Values
    do not depend on it.
    tally: on unbounded input, a streaming job's tally (transforms/counters.py) to count into as well.
    batched: bounded input only, PCollection[list[Event]] in and
    PCollection[list[FeatureRow]] out, a list per day of request time (one
    element per list, not per row: the runner's cost is per element)."""

    def __init__(self, spec: FeatureSpec, allowed_lateness_s: int = 3600, key_shards: Optional[int] = None,
                 release_step_ms: int = 0, label: Optional[str] = None, tally: Optional[str] = None,
                 batched: bool = False):
        super().__init__(label)
        if key_shards is not None and key_shards < 1:
            raise ValueError(f"key_shards must be None or at least 1, got {key_shards}")
        if release_step_ms < 0:
            raise ValueError(f"release_step_ms must be 0 or more, got {release_step_ms}")
        self._spec = spec
        self._lateness_s = allowed_lateness_s
        self._shards = key_shards
        self._step_us = release_step_ms * 1000
        self._tally = tally
        self._batched = batched

    def expand(self, events):
        layout = EventLayout.of(self._spec)
        groups = feature_groups(self._spec)
        if events.is_bounded:
            hours = events | "Features" >> BucketedFeatures(layout, groups, self._batched)
            if self._batched:
                return hours | "ToRows" >> beam.ParDo(_ToRows(layout, flat=False)).with_output_types(Batch)
            return hours | "ToRows" >> beam.ParDo(_ToRows(layout, flat=True)).with_output_types(FeatureRow)
        if self._batched:
            raise ValueError("WindowedFeatures: batched is for bounded input")
        empty = (None,) * len(self._spec.windowed_features)
        requests = (events
                    | "Start" >> beam.Map(lambda event: layout.to_item(event, empty))
                    | "Features" >> StreamingFeatures(groups, self._lateness_s, self._shards, self._step_us,
                                                      self._tally))
        return requests | "ToRows" >> beam.ParDo(_ToRow(layout)).with_output_types(FeatureRow)

"""The part of a history a job with a time range needs: requests in
[start, end), and the observations those requests can see. Windows are
[t - W, t), so an observation at or after end, or before start minus the
longest window, feeds no request in the range."""

from __future__ import annotations

from typing import Optional

import apache_beam as beam

from transforms import counters
from transforms.events import Event
from transforms.gather import Batch

REQUEST = "request"


def in_time_range(event: Event, start_us: Optional[int], end_us: Optional[int], reach_us: int) -> bool:
    """Whether the job needs `event`: a request in [start, end), or an observation
    such a request can see (`reach_us`: the spec's longest window)."""
    if end_us is not None and event.time_us >= end_us:
        return False
    if start_us is None:
        return True
    return event.time_us >= (start_us if event.role == REQUEST else start_us - reach_us)


def read_bounds_us(start_us: Optional[int], end_us: Optional[int], reach_us: int) -> tuple[Optional[int], Optional[int]]:
    """[since, until) of the events to read at all for requests in [start, end)."""
    return (None if start_us is None else start_us - reach_us), end_us


class _KeepInRange(beam.DoFn):
    def __init__(self, start_us: Optional[int], end_us: Optional[int], reach_us: int):
        self._range = (start_us, end_us, reach_us)
        self._in_range = counters.REQUESTS_IN_RANGE.metric()
        self._outside = counters.REQUESTS_OUTSIDE_RANGE.metric()
        self._observations_outside = counters.OBSERVATIONS_OUTSIDE_RANGE.metric()

    def process(self, event: Event):
        if self._keep(event):
            yield event

    def _keep(self, event: Event) -> bool:
        keep = in_time_range(event, *self._range)
        if event.role == REQUEST:
            (self._in_range if keep else self._outside).inc()
        elif not keep:
            self._observations_outside.inc()
        return keep


@beam.typehints.with_output_types(Batch)
class _KeepListInRange(_KeepInRange):
    def process(self, events: list):
        kept = [event for event in events if self._keep(event)]
        if kept:
            yield Batch(kept)


class TimeRange(beam.PTransform):
    """PCollection[Event] -> PCollection[Event]: what requests in [start, end) need
    (None: unbounded), each request counted in or outside the range; with
    batched, PCollection[list[Event]] in and out."""

    def __init__(self, start_us: Optional[int], end_us: Optional[int], reach_us: int, batched: bool = False):
        super().__init__()
        self._range = (start_us, end_us, reach_us)
        self._batched = batched

    def expand(self, events):
        keep = _KeepListInRange if self._batched else _KeepInRange
        return events | "KeepInRange" >> beam.ParDo(keep(*self._range))

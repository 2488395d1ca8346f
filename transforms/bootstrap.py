"""Warm start: the recent history a (re)started streaming job loads into its
feature state before it answers requests.

A job that starts with empty windows answers its first requests from
partial windows: for the first max(window) after every deploy, its features
differ from batch. `RecentObservations` reads history in the batch job's
format (CSV through the spec's adapter, or NDJSON events) and keeps the
observations a request arriving after `since_us` can still see. The
streaming job flattens them with the live events, ahead of the
de-duplication (history and the subscription's backlog may overlap):

- it is a bounded read, so the merged input's watermark stays behind until
  the read is done: no feature timer fires, and no request is answered,
  before the whole history is in state;
- each observation is stamped with its event time: the feature state takes
  them as late observations, in time order with the live ones.

Requests in the history are left out (they were answered by the job that
read them), as are records that do not parse: they were dead letters of the
job or batch run that read them first, and a restart must not write them
again. Both are counted.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import apache_beam as beam
from apache_beam.utils.timestamp import Timestamp

from transforms import counters
from transforms.events import Event, InvalidRecord, RawRecord
from transforms.parse import RecordParser
from transforms.read_files import ReadChunks
from transforms.adapters import CsvAdapter
from transforms.spec import REQUEST, FeatureSpec


def recent_observations(parse: RecordParser, records: Iterable[RawRecord], since_us: int,
                        counts: Optional[dict] = None) -> list[Event]:
    """The observations of `records` at or after `since_us`, in input order;
    `counts` (if given) gains how many records were read, unreadable, too old,
    or requests."""
    counts = counts if counts is not None else {}
    kept = []
    for record in records:
        counts["records"] = counts.get("records", 0) + 1
        try:
            events = parse(record)
        except (InvalidRecord, ValueError):
            counts["unreadable"] = counts.get("unreadable", 0) + 1
            continue
        for event in events:
            if event.role == REQUEST:
                counts["requests"] = counts.get("requests", 0) + 1
            elif event.time_us < since_us:
                counts["older"] = counts.get("older", 0) + 1
            else:
                kept.append(event)
    counts["observations"] = counts.get("observations", 0) + len(kept)
    return kept


class _KeepRecent(beam.DoFn):
    """A chunk of RawRecords -> its recent observations, stamped with their event time."""

    def __init__(self, spec: FeatureSpec, since_us: int, adapters: Mapping[str, CsvAdapter]):
        self._spec = spec
        self._since_us = since_us
        self._adapters = dict(adapters)
        self._counters = {name: counters.bootstrap(name).metric()
                          for name in ("records", "unreadable", "requests", "older", "observations")}

    def setup(self):
        self._parse = RecordParser(self._spec, self._adapters)

    def process(self, chunk: list[RawRecord]):
        counts: dict = {}
        kept = recent_observations(self._parse, chunk, self._since_us, counts)
        for name, value in counts.items():
            self._counters[name].inc(value)
        for event in kept:
            yield beam.window.TimestampedValue(event, Timestamp(micros=event.time_us))


class RecentObservations(beam.PTransform):
    """PBegin -> PCollection[Event]: the observations at or after `since_us`
    in the files `pattern` names (local or gs://, a glob), stamped with their
    event times. Bounded, so a streaming job reads it once, at start.
    source_name: the spec's source whose CSV adapter (in `adapters`) reads them."""

    def __init__(self, spec: FeatureSpec, pattern: str, since_us: int, input_format: str = "auto",
                 adapters: Optional[Mapping[str, CsvAdapter]] = None, source_name: Optional[str] = None,
                 label: Optional[str] = None):
        super().__init__(label)
        self._spec = spec
        self._pattern = pattern
        self._since_us = since_us
        self._input_format = input_format
        self._adapters = dict(adapters or {})
        self._source_name = source_name

    def expand(self, pbegin):
        return (
            pbegin
            | "Chunks" >> ReadChunks(self._pattern, self._input_format, self._source_name)
            | "KeepRecent" >> beam.ParDo(_KeepRecent(self._spec, self._since_us, self._adapters))
        )

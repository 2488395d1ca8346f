"""`WriteOnlineStore`: the streaming job keeps the online store (layout.py).

    accepted events (de-duplicated, warm-start history included)
      -> _WriteObservations: each observation's cells, one mutate_rows call per bundle
         (and per 2,000 cells); then, per bundle, the latest event time it wrote
      -> _Progress (one state): a watermark timer every PROGRESS_STEP_MS writes the
         store's `through` mark: min(the tick, the latest event time written)

The mark at a tick T is min(T, the latest event time written). Why it can be trusted:
- T: the timer fires once the watermark at _Progress has passed T, and that watermark cannot
  pass T before every bundle upstream holding an event older than T has finished, its writes
  included. Where the runner's watermark follows the source's backlog (Dataflow's Pub/Sub
  source), every on-time observation before T is in the store.
- The latest event time written: the DirectRunner's watermark is the wall clock, not the
  source's backlog, so T runs ahead of messages not pulled yet (measured: a replay that the
  job took 50 s to read had a mark past its last event after 3 s, and 110 of 185 answers
  marked complete were not). The store has no event after the latest it wrote; an event
  before it that arrives later is out of order: late, as the stream sees it too.
Late observations are written when they arrive, after the mark passed them; the
consistency job explains an answer that missed one as a late observation.

The timer goes on ticking PROGRESS_IDLE_STEPS after the latest event it heard
of, then waits for the next: a stream that ends (a test's TestStream, whose
watermark jumps to the end of time) does not tick forever, and a stream idle
for longer shows a store behind by its idle time: conservative, never wrong.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from beam_app.online.bigtable_store import open_table, write_cells, write_through
from beam_app.online.layout import TablePath, observation_cells, parse_table_path
from transforms import counters
from transforms.feature_layout import EventLayout, feature_groups
from transforms.spec import FeatureSpec

PROGRESS_STEP_MS = 1000
PROGRESS_IDLE_STEPS = 60
FLUSH_CELLS = 2000

# Tables by path (and emulator), kept across the DirectRunner's per-bundle DoFn copies (a client
# per bundle would open a channel per bundle); on Dataflow a DoFn lives across bundles anyway.
_TABLES: dict[tuple, object] = {}
_TABLES_LOCK = threading.Lock()


def _table(path: str):
    key = (path, os.environ.get("BIGTABLE_EMULATOR_HOST"))
    with _TABLES_LOCK:
        if key not in _TABLES:
            _TABLES[key] = open_table(parse_table_path(path))
        return _TABLES[key]


@beam.typehints.with_output_types(beam.typehints.Tuple[int, int])
class _WriteObservations(beam.DoFn):
    """Event -> its cells in the store; per bundle, after its writes, (0, the latest event time seen)."""

    def __init__(self, spec: FeatureSpec, path: TablePath):
        self._spec = spec
        self._path = str(path)
        self._cells_written = counters.ONLINE_CELLS_WRITTEN.metric()
        self._observations = counters.ONLINE_OBSERVATIONS_WRITTEN.metric()

    def setup(self):
        self._layout = EventLayout.of(self._spec)
        self._groups = feature_groups(self._spec)

    def start_bundle(self):
        self._cells, self._latest_us = [], None

    def process(self, event, timestamp=beam.DoFn.TimestampParam):
        cells = observation_cells(self._layout, self._groups, event)
        if cells:
            self._observations.inc()
            self._cells.extend(cells)
            if len(self._cells) >= FLUSH_CELLS:
                self._flush()
        if self._latest_us is None or timestamp.micros > self._latest_us:
            self._latest_us = timestamp.micros

    def _flush(self):
        write_cells(_table(self._path), self._cells)
        self._cells_written.inc(len(self._cells))
        self._cells = []

    def finish_bundle(self):
        self._flush()
        if self._latest_us is not None:
            yield WindowedValue((0, self._latest_us), Timestamp(micros=self._latest_us), [GlobalWindow()])


def _step_after(time_us: int) -> int:
    """The first progress step boundary after time_us (µs, a whole ms)."""
    step_us = PROGRESS_STEP_MS * 1000
    return (time_us // step_us + 1) * step_us


class _Progress(beam.DoFn):
    """(0, latest event time written) -> the store's `through` mark, by a watermark timer."""

    LATEST = ReadModifyWriteStateSpec("latest", VarIntCoder())
    DUE = ReadModifyWriteStateSpec("due", VarIntCoder())
    MARKED = ReadModifyWriteStateSpec("marked", VarIntCoder())
    TICK = TimerSpec("tick", TimeDomain.WATERMARK)

    def __init__(self, path: TablePath):
        self._path = str(path)
        self._marks = counters.ONLINE_PROGRESS_MARKS.metric()

    def process(self, element, latest=beam.DoFn.StateParam(LATEST), due=beam.DoFn.StateParam(DUE),
                tick=beam.DoFn.TimerParam(TICK)):
        _, latest_us = element
        seen = latest.read()
        if seen is None or latest_us > seen:
            latest.write(latest_us)
        if due.read() is None:
            at = _step_after(latest_us)
            tick.set(Timestamp(micros=at))
            due.write(at)

    @on_timer(TICK)
    def on_tick(self, fired_at=beam.DoFn.TimestampParam, latest=beam.DoFn.StateParam(LATEST),
                due=beam.DoFn.StateParam(DUE), marked=beam.DoFn.StateParam(MARKED), tick=beam.DoFn.TimerParam(TICK)):
        latest_us = latest.read() or 0
        mark_us = progress_mark(fired_at.micros, latest_us)
        if mark_us > (marked.read() or -1):
            write_through(_table(self._path), mark_us)
            marked.write(mark_us)
            self._marks.inc()
        next_us = max(fired_at.micros + PROGRESS_STEP_MS * 1000, _step_after(latest_us))
        if next_us > latest_us + PROGRESS_IDLE_STEPS * PROGRESS_STEP_MS * 1000:
            due.clear()  # idle: the next event sets it again
            return
        tick.set(Timestamp(micros=next_us))
        due.write(next_us)


def progress_mark(tick_us: int, latest_written_us: int) -> int:
    """The store's `through` at a tick: what the watermark has passed, capped by what has been written."""
    return min(tick_us, latest_written_us)


class WriteOnlineStore(beam.PTransform):
    """PCollection[Event] (accepted events, stamped with their event times) -> the
    observations' cells in the online store, and its progress mark. Returns the
    PCollection of progress marks' inputs (nothing to consume)."""

    def __init__(self, spec: FeatureSpec, table: str, label: Optional[str] = None):
        super().__init__(label)
        self._spec = spec
        self._path = parse_table_path(table)

    def expand(self, events):
        return (events
                | "WriteObservations" >> beam.ParDo(_WriteObservations(self._spec, self._path))
                | "Progress" >> beam.ParDo(_Progress(self._path)))

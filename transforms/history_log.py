"""A key's feature history as an append-only log in state, with no Beam in it.

The streaming point-in-time step keeps each state key's histories (one
`KeyHistory` per key value) in a bag of log entries, so that a timer firing
writes what it changed and reads nothing it did not need:

- a **delta** per key value and firing: the observations the firing applied
  (time, event_id, values) and the time the key has processed through;
- a **snapshot** per key value, written when the log is compacted: the
  history's own state (`KeyHistory.to_state`), what a window can still reach.

The decoded histories stay in the worker's memory between firings
(transforms/kept_histories.py); the log is read back only when they are not
there (a new worker, a restart, a key that moved). Replaying the log gives
the same history the firings built in memory: the engine's answers depend
only on the set of observations and the time processed through, never on
the order they were added (transforms/point_in_time.py).

A bag cannot drop its head, so the log is rewritten as snapshots once it
holds more than `COMPACT_FACTOR` times what the histories hold: each
observation is written O(1) times, amortized.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from transforms.point_in_time import OBSERVATION, KeyHistory, PendingEvent
from transforms.spec import WindowedFeature

DELTA, SNAPSHOT = 0, 1
COMPACT_FACTOR = 2
COMPACT_SLACK = 64  # observations: a small history is not rewritten at every firing


def delta_entry(key: str, processed_through_us: Optional[int], applied: Iterable[PendingEvent]) -> tuple:
    """What one firing applied to a key value's history, as a log entry."""
    return (DELTA, key, processed_through_us,
            tuple((event.time_us, event.event_id, event.values) for event in applied if event.rank == OBSERVATION))


def snapshot_entry(key: str, history: KeyHistory) -> tuple:
    """A key value's whole history (what a window can still reach), as a log entry: a
    copy, as a bag may hold what was added as it is until the bundle commits, while
    the history kept in memory goes on changing."""
    through, all_times, series_times, series_values, series_ids = history.to_state()
    return SNAPSHOT, key, (through, list(all_times), tuple(map(list, series_times)),
                           tuple(map(list, series_values)), tuple(map(list, series_ids)))


def entry_size(entry: tuple) -> int:
    """Observations an entry holds (what the log's length is measured in)."""
    return len(entry[3]) if entry[0] == DELTA else len(entry[2][1])


def _merged(state: Optional[tuple], processed_through_us: Optional[int], observations: list) -> tuple:
    """A history's state with more observations in it, each list kept sorted
    (all times by time; a series by (time, event_id), as `add_observation` keeps them)."""
    if state is None:
        width = len(observations[0][2]) if observations else 0
        state = (None, [], ((),) * width, ((),) * width, ((),) * width)
    through, all_times, series_times, series_values, series_ids = state
    if processed_through_us is not None and (through is None or processed_through_us > through):
        through = processed_through_us
    all_times = sorted([*all_times, *(time_us for time_us, _, _ in observations)])
    merged_times, merged_values, merged_ids = [], [], []
    for index, (times, values, ids) in enumerate(zip(series_times, series_values, series_ids)):
        entries = list(zip(times, ids, values))
        entries.extend((time_us, event_id, values_[index]) for time_us, event_id, values_ in observations
                       if values_[index] is not None)
        entries.sort(key=lambda entry: (entry[0], entry[1]))
        merged_times.append([time_us for time_us, _, _ in entries])
        merged_ids.append([event_id for _, event_id, _ in entries])
        merged_values.append([value for _, _, value in entries])
    return through, all_times, tuple(merged_times), tuple(merged_values), tuple(merged_ids)


def histories_from_log(features: Sequence[WindowedFeature], lateness_s: int, entries: Iterable[tuple]
                       ) -> dict[str, KeyHistory]:
    """The log of a state key, in the order it was appended -> its histories by key value."""
    states: dict[str, Optional[tuple]] = {}
    pending: dict[str, tuple[Optional[int], list]] = {}
    for entry in entries:
        if entry[0] == SNAPSHOT:
            _, key, state = entry
            states[key] = state
            pending.pop(key, None)  # a snapshot holds everything logged before it
        else:
            _, key, through, observations = entry
            states.setdefault(key, None)
            before, kept = pending.get(key, (None, []))
            kept.extend(observations)
            pending[key] = (through if before is None or (through is not None and through > before) else before,
                            kept)
    histories = {}
    for key, state in states.items():
        through, observations = pending.get(key, (None, []))
        if observations or through is not None:
            state = _merged(state, through, observations)
        history = KeyHistory.from_state(features, state, lateness_s)
        if history.processed_through_us is not None:
            history.evict_before(history.processed_through_us)
        histories[key] = history
    return histories


def live_size(histories: dict[str, KeyHistory]) -> int:
    """Observations the histories hold."""
    return sum(len(history.times[0]) for history in histories.values())


def ended(history: KeyHistory, watermark_us: int) -> bool:
    """Whether no request can read the history any more: the watermark has passed its
    newest event plus the horizon, so a request that is not later than the allowed
    lateness comes after every window that holds one of its observations."""
    return history.processed_through_us is not None and history.processed_through_us + history.horizon_us <= watermark_us


def next_entries(histories: dict[str, KeyHistory], logged: int, deltas: list[tuple], watermark_us: int
                 ) -> tuple[list[tuple], bool, int, int]:
    """After a firing applied `deltas` to `histories`, whose log held `logged`
    observations -> (the entries to write, whether they replace the log, the
    observations the log then holds, how many key values ended). The log is
    rewritten as snapshots once it holds more than COMPACT_FACTOR times what the
    histories hold; the key values that have `ended` by the watermark are then
    left out, and out of `histories` (a state key holding several: a shard)."""
    logged += sum(map(entry_size, deltas))
    if logged > COMPACT_FACTOR * live_size(histories) + COMPACT_SLACK:
        gone = [key for key, history in histories.items() if ended(history, watermark_us)]
        for key in gone:
            del histories[key]
        snapshots = [snapshot_entry(key, history) for key, history in histories.items()]
        return snapshots, True, sum(map(entry_size, snapshots)), len(gone)
    return deltas, False, logged, 0


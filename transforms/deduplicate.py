"""At most once per event: one rule for batch and streaming.

An event is identified by (role, event_id). Inputs are at least once (Pub/Sub
redelivers, producers retry, history files overlap), so:

- an identical copy (same identity, same event time and fields) of an event
  already accepted is a **duplicate**: counted (`duplicates/<role>`) and
  dropped; it changes nothing;
- a copy with the same identity and other content is a **conflict**: a dead
  letter (stage `duplicate`) whose reason names both versions, counted
  (`conflicts/<role>`); the first accepted copy stays.

"First" is arrival order in streaming. In batch, where there is no arrival
order, the copies of an identity are offered in the order of their canonical
JSON, so the kept one does not depend on how the input was split or read.

`IdLedger` is the pure engine; `DeduplicateEvents` the Beam wrapper. The
ledger forgets an identity `horizon_s` after its event time (the longest
window plus the allowed lateness: when the feature history forgets the
event), so its state is bounded by the traffic of one horizon. A copy that
comes after that is beyond the allowed lateness, which the live parser
already refuses for requests (transforms/event_time.py).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable, Optional

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from transforms import counters
from transforms.events import DeadLetter, Event, event_from_json, event_to_json, time_us_to_rfc3339
from transforms.event_time import timer_us
from transforms.feature_layout import state_key
from transforms.gather import Batch, GatherInBundle

_US = 1_000_000
STAGE = "duplicate"  # the dead-letter stage of conflicting copies
ARRIVED = "arrived"  # streaming: the accepted events that came from the live input (not the warm start)

NEW, DUPLICATE, CONFLICT = "new", "duplicate", "conflict"


def identity(event: Event) -> str:
    """(role, event_id) as one string: the publisher's `message_key` has the same form."""
    return f"{event.event_id}/{event.role}"


def describe_conflict(kept: Event, copy: Event) -> str:
    """The dead-letter reason for `copy`: which event, and what differs from the kept version."""
    differences = []
    if kept.time_us != copy.time_us:
        differences.append(f"event_time {time_us_to_rfc3339(kept.time_us)} (kept) vs "
                           f"{time_us_to_rfc3339(copy.time_us)} (this copy)")
    for name in sorted(set(kept.fields) | set(copy.fields)):
        if kept.fields.get(name) != copy.fields.get(name):
            differences.append(f"{name} {kept.fields.get(name)!r} (kept) vs {copy.fields.get(name)!r} (this copy)")
    return (f"conflicting duplicate: {copy.role} {copy.event_id} was already accepted with other content "
            f"({'; '.join(differences)}); kept: {event_to_json(kept)}")


class IdLedger:
    """The identities accepted within the horizon, each with its content."""

    def __init__(self, horizon_us: int, entries: Optional[dict] = None):
        self.horizon_us = horizon_us
        self.entries: dict[str, tuple[str, int]] = dict(entries or {})  # identity -> (canonical JSON, forget at)

    def admit(self, event: Event) -> tuple[str, Optional[str]]:
        """(NEW, None), (DUPLICATE, None) or (CONFLICT, reason); NEW events are remembered."""
        key = identity(event)
        content = event_to_json(event)
        seen = self.entries.get(key)
        if seen is None:
            self.entries[key] = (content, event.time_us + self.horizon_us)
            return NEW, None
        if seen[0] == content:
            return DUPLICATE, None
        # The kept copy back from its canonical JSON (which leaves out missing fields: .get gives None for both).
        return CONFLICT, describe_conflict(event_from_json(seen[0]), event)

    def forget_through(self, time_us: int) -> None:
        """Forget every identity whose event is older than the horizon at `time_us`."""
        self.entries = {key: entry for key, entry in self.entries.items() if entry[1] > time_us}

    def next_forget_us(self) -> Optional[int]:
        return min((entry[1] for entry in self.entries.values()), default=None)


def resolve_copies(copies: Iterable[Event]) -> tuple[Event, int, list[tuple[Event, str]]]:
    """Every copy of one identity (batch) -> (the kept event, identical
    duplicates, [(conflicting copy, reason)]): offered in canonical order."""
    ledger = IdLedger(horizon_us=0)  # one identity, all at once: nothing to forget
    kept, duplicates, conflicts = None, 0, []
    for copy in sorted(copies, key=event_to_json):
        verdict, reason = ledger.admit(copy)
        if verdict == NEW:
            kept = copy
        elif verdict == DUPLICATE:
            duplicates += 1
        else:
            conflicts.append((copy, reason))
    return kept, duplicates, conflicts


def conflict_letter(copy: Event, reason: str) -> DeadLetter:
    return DeadLetter(f"event:{identity(copy)}", event_to_json(copy), reason, STAGE)


class _RoleCounters(dict):
    """A counter per role (request or a kind of observation), made on first use."""

    def __init__(self, counter_of: Callable[[str], counters.Counter], tally: Optional[str] = None):
        super().__init__()
        self._counter_of = counter_of
        self._tally = tally

    def __missing__(self, role: str):
        self[role] = counter = self._counter_of(role).metric(self._tally)
        return counter


class _Counters:
    """The dedup counters of each role: duplicates/<role>, conflicts/<role>; accepted/<role> (live events only)."""

    def __init__(self, tally: Optional[str] = None):
        self.duplicates = _RoleCounters(counters.duplicates, tally)
        self.conflicts = _RoleCounters(counters.conflicts, tally)
        self.accepted = _RoleCounters(counters.accepted, tally)


_BATCH_SHARDS = 64  # identities per shuffle key in batch: all copies of one identity meet in one shard


def _by_identity_shard(event: Event):
    # A plain tuple, not the Event: Beam's fast coder pickles NamedTuples.
    yield zlib.crc32(identity(event).encode()) % _BATCH_SHARDS, tuple(event)


def _list_by_identity_shard(events: list):
    for event in events:
        yield zlib.crc32(identity(event).encode()) % _BATCH_SHARDS, tuple(event)


class _ResolveBatch(beam.DoFn):
    """(shard, [[event as a tuple]]) -> the kept Event of each identity, or
    their list as one element (`batched`) | DeadLetter (tagged) per conflicting copy."""

    def __init__(self, batched: bool = False):
        self._batched = batched

    def setup(self):
        self._counters = _Counters()

    def process(self, keyed):
        _, lists = keyed
        copies: dict[str, list[Event]] = {}
        for events in lists:
            for fields in events:
                event = Event(*fields)
                copies.setdefault(identity(event), []).append(event)
        kept_events = []
        for same in copies.values():
            if len(same) == 1:  # almost every identity: nothing to resolve
                kept_events.append(same[0])
                continue
            kept, duplicates, conflicts = resolve_copies(same)
            self._counters.duplicates[kept.role].inc(duplicates)
            self._counters.conflicts[kept.role].inc(len(conflicts))
            for copy, reason in conflicts:
                yield beam.pvalue.TaggedOutput(STAGE, conflict_letter(copy, reason))
            kept_events.append(kept)
        if not self._batched:
            yield from kept_events
        elif kept_events:
            yield Batch(kept_events)


class _DeduplicateLive(beam.DoFn):
    """(state key, Event) -> Event | DeadLetter (tagged), judged on arrival.

    Not buffered until the watermark passes, as the feature stages are: the
    DirectRunner does not hold a step's output watermark for its pending
    timers, so events released by a timer reach the next stateful step
    behind its watermark, out of order (measured: 95 of 213 requests of a
    replay lost observations). Judged on arrival, an event leaves with the
    bundle it came in. A timer forgets identities past the horizon, so a
    ledger never outlives its events."""

    LEDGER = ReadModifyWriteStateSpec("ledger", FastPrimitivesCoder())
    FORGET_AT = ReadModifyWriteStateSpec("forget_at", VarIntCoder())
    FORGET = TimerSpec("forget", TimeDomain.WATERMARK)

    def __init__(self, horizon_us: int, tally: Optional[str] = None):
        self._horizon_us = horizon_us
        self._tally = tally

    def setup(self):
        self._counters = _Counters(self._tally)

    def process(self, element, ledger_state=beam.DoFn.StateParam(LEDGER),
                forget_at=beam.DoFn.StateParam(FORGET_AT), forget=beam.DoFn.TimerParam(FORGET)):
        _, (event, live) = element
        ledger = IdLedger(self._horizon_us, ledger_state.read())
        verdict, reason = ledger.admit(event)
        if verdict == NEW:
            ledger_state.write(ledger.entries)
            pending = forget_at.read()
            due = timer_us(event.time_us + self._horizon_us)
            if pending is None or due < pending:
                forget.set(Timestamp(micros=due))
                forget_at.write(due)
            yield event
            if live:
                self._counters.accepted[event.role].inc()
                yield beam.pvalue.TaggedOutput(ARRIVED, event)
        elif verdict == DUPLICATE:
            self._counters.duplicates[event.role].inc()
        else:
            self._counters.conflicts[event.role].inc()
            yield beam.pvalue.TaggedOutput(STAGE, conflict_letter(event, reason))

    @on_timer(FORGET)
    def on_forget(self, fired_at=beam.DoFn.TimestampParam, ledger_state=beam.DoFn.StateParam(LEDGER),
                  forget_at=beam.DoFn.StateParam(FORGET_AT), forget=beam.DoFn.TimerParam(FORGET)):
        ledger = IdLedger(self._horizon_us, ledger_state.read())
        ledger.forget_through(fired_at.micros)
        due = ledger.next_forget_us()
        if due is None:
            ledger_state.clear()
            forget_at.clear()
            return
        due = timer_us(due)
        ledger_state.write(ledger.entries)
        forget.set(Timestamp(micros=due))
        forget_at.write(due)


class DeduplicateEvents(beam.PTransform):
    """PCollection[Event] -> {"events": PCollection[Event], each identity once,
    "duplicate": PCollection[DeadLetter] of conflicting copies}.

    Streaming takes (live events, warm-start history) as well: both are
    judged together (a redelivered copy of a history event is a duplicate),
    and "arrived" holds the accepted events of the live input alone, for
    the events archive (the history is archived already).

    horizon_s: how long (event time) an identity is remembered: the longest
    window plus the allowed lateness. Unbounded input only:
    key_shards: None keeps a ledger per identity (Dataflow: a few bytes of
    state per key); N hashes identities into N ledgers, each read and
    written per event, so an event costs O(identities in the horizon / N)
    (the DirectRunner, where every key is a bundle of its own).
    tally: a streaming job's tally (transforms/counters.py) to count into as well.
    batched: bounded input only, PCollection[list[Event]] in and "events" out
    (one element per list: the runner's cost is per element)."""

    def __init__(self, horizon_s: int, key_shards: Optional[int] = None, label: Optional[str] = None,
                 tally: Optional[str] = None, batched: bool = False):
        super().__init__(label)
        self._batched = batched
        self._horizon_us = horizon_s * _US
        self._shards = key_shards
        self._tally = tally

    def expand(self, events):
        history = None
        if isinstance(events, tuple):
            events, history = events
        if events.is_bounded:
            if history is not None:
                raise ValueError("DeduplicateEvents: a warm-start history is for unbounded input only")
            outputs = (
                events
                | "ByIdentity" >> beam.ParDo(GatherInBundle(
                    _list_by_identity_shard if self._batched else _by_identity_shard)).with_output_types(
                        tuple[int, list])
                | "GroupCopies" >> beam.GroupByKey()
                | "Resolve" >> (beam.ParDo(_ResolveBatch(self._batched)).with_output_types(Batch) if self._batched
                               else beam.ParDo(_ResolveBatch())).with_outputs(STAGE, main="events")
            )
        else:
            if self._batched:
                raise ValueError("DeduplicateEvents: batched is for bounded input")
            shards = self._shards
            tagged = events | "Live" >> beam.Map(lambda event: (event, True))
            if history is not None:
                tagged = (tagged, history | "History" >> beam.Map(lambda event: (event, False))) | "WithHistory" >> (
                    beam.Flatten())
            outputs = (
                tagged
                | "ByIdentity" >> beam.Map(lambda item: (state_key(identity(item[0]), shards), item)).with_output_types(
                    tuple[str, Any])
                | "Judge" >> beam.ParDo(_DeduplicateLive(self._horizon_us, self._tally)).with_outputs(
                    STAGE, ARRIVED, main="events")
            )
            return {"events": outputs.events, STAGE: outputs[STAGE], ARRIVED: outputs[ARRIVED]}
        return {"events": outputs.events, STAGE: outputs[STAGE]}

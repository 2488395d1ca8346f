"""The streaming history's log (transforms/history_log.py): read back at any
point, with or without compactions in between, it gives the histories the
firings built in memory: the same answers, bit for bit, to any later request.
And the kept histories (transforms/kept_histories.py) are handed out only
under the token they were kept with."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.scan_engine import bits
from transforms import history_log
from transforms.history_log import delta_entry, histories_from_log, next_entries
from transforms.kept_histories import KeptHistories
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent
from transforms.spec import WindowedFeature

MIN = 60_000_000
KEY = ("origin",)
FEATURES = (
    WindowedFeature("n_1h", KEY, "count", 3600),
    WindowedFeature("mean_1h", KEY, "mean", 3600, "delay"),
    WindowedFeature("max_2h", KEY, "max", 7200, "delay"),
    WindowedFeature("std_2h", KEY, "stddev", 7200, "delay"),
    WindowedFeature("last3_2h", KEY, "last_k", 7200, "distance", k=3),
    WindowedFeature("distinct_1h", KEY, "count_distinct", 3600, "distance"),
    WindowedFeature("since_2h", KEY, "time_since_last", 7200),
)
LATENESS_S = 600
VALUE = st.one_of(st.none(), st.integers(-50, 50).map(float), st.sampled_from([0.5, -0.0, 1e-310, 2.5]))
EVENT = st.tuples(st.integers(0, 400), st.booleans(), st.integers(0, 30), VALUE, VALUE)  # minute, request?, id, values
FIRINGS = st.lists(st.lists(st.tuples(st.sampled_from("ab"), EVENT), max_size=12), min_size=1, max_size=25)


def _pending(minute, is_request, number, delay, distance) -> PendingEvent:
    if is_request:
        return PendingEvent(minute * MIN, REQUEST, f"r{number}", ())
    # One value per series, in the history's series order: ("delay",), ("distance",).
    return PendingEvent(minute * MIN, OBSERVATION, f"o{number}", (delay, distance))


def _probe(histories: dict[str, KeyHistory], key: str, minute: int):
    history = histories.get(key)
    return bits(history.features_at(minute * MIN)) if history else None


@settings(max_examples=150, deadline=None)
@given(firings=FIRINGS, compact_slack=st.sampled_from([0, 3, 64]), probe=st.integers(0, 500))
def test_the_log_read_back_answers_as_the_histories_kept_in_memory(firings, compact_slack, probe):
    with _slack(compact_slack):
        _check_read_back(firings, probe)


@contextlib.contextmanager
def _slack(slack: int):
    """COMPACT_SLACK for a while: 0 compacts at nearly every firing (hypothesis runs many examples
    per test call, so pytest's function-scoped monkeypatch cannot reset it between them)."""
    saved, history_log.COMPACT_SLACK = history_log.COMPACT_SLACK, slack
    try:
        yield
    finally:
        history_log.COMPACT_SLACK = saved


def _check_read_back(firings, probe):
    kept: dict[str, KeyHistory] = {}
    log: list[tuple] = []
    logged = 0
    compactions = 0
    for firing in firings:
        by_key: dict[str, list[PendingEvent]] = {}
        for key, event in firing:
            by_key.setdefault(key, []).append(_pending(*event))
        deltas = []
        for key, events in by_key.items():
            history = kept.setdefault(key, KeyHistory(FEATURES, LATENESS_S))
            history.apply(events)
            deltas.append(delta_entry(key, history.processed_through_us, events))
        entries, replace, logged, ended = next_entries(kept, logged, deltas, watermark_us=0)
        assert ended == 0  # the watermark has passed nothing
        compactions += replace
        log = entries if replace else log + entries
        assert logged == sum(map(history_log.entry_size, log))
        read_back = histories_from_log(FEATURES, LATENESS_S, log)
        for key in "ab":
            assert _probe(read_back, key, probe) == _probe(kept, key, probe), (key, probe)
            if key in kept:
                assert read_back[key].processed_through_us == kept[key].processed_through_us


def test_a_compacted_log_holds_what_the_windows_reach():
    kept = {"a": KeyHistory(FEATURES, LATENESS_S)}
    log, logged = [], 0
    for minute in range(0, 3000, 5):  # two days of an observation every 5 minutes
        events = [_pending(minute, False, minute, 1.0, 2.0), _pending(minute, True, minute, None, None)]
        kept["a"].apply(events)
        entries, replace, logged, _ = next_entries(kept, logged, [delta_entry("a", kept["a"].processed_through_us,
                                                                              events)], minute * MIN)
        log = entries if replace else log + entries
    horizon_observations = (7200 + LATENESS_S) // 300  # the longest window plus lateness, one every 5 min
    assert logged <= history_log.COMPACT_FACTOR * (horizon_observations + 1) + history_log.COMPACT_SLACK + 2
    assert any(entry[0] == history_log.SNAPSHOT for entry in log)


def test_a_shards_key_values_end_when_the_watermark_passes_their_newest_event_plus_the_horizon():
    horizon_us = (7200 + LATENESS_S) * 1_000_000
    kept = {key: KeyHistory(FEATURES, LATENESS_S) for key in "abc"}
    for key, minute in (("a", 0), ("b", 1), ("c", 200)):
        kept[key].apply([_pending(minute, False, minute, 1.0, 2.0)])
    assert history_log.ended(kept["a"], horizon_us) and not history_log.ended(kept["b"], horizon_us)
    # A firing of "c" far later, with a log long enough to be rewritten: "a" and "b" have ended by then.
    deltas = [delta_entry("c", kept["c"].processed_through_us, [_pending(200, False, 200, 1.0, 2.0)])]
    entries, replace, logged, ended = next_entries(kept, 10_000, deltas, 200 * MIN)
    assert replace and ended == 2 and set(kept) == {"c"} and {entry[1] for entry in entries} == {"c"}
    # Before the log is due for a rewrite, nothing is dropped: the log would still hold them.
    kept = {key: KeyHistory(FEATURES, LATENESS_S) for key in "ab"}
    kept["a"].apply([_pending(0, False, 0, 1.0, 2.0)])
    kept["b"].apply([_pending(200, False, 1, 1.0, 2.0)])
    assert next_entries(kept, 0, [], 200 * MIN)[1:] == (False, 0, 0) and set(kept) == {"a", "b"}


def test_kept_histories_are_handed_out_once_and_only_under_their_token():
    kept = KeptHistories(max_size=10)
    kept.put(("step", "k"), 7, "histories", 4)
    assert kept.take(("step", "k"), 8) is None  # another writer's state: rebuilt
    assert kept.take(("step", "k"), 7) is None  # a miss drops the entry: it is stale for good
    kept.put(("step", "k"), 7, "histories", 4)
    assert kept.take(("step", "k"), 7) == "histories"
    assert kept.take(("step", "k"), 7) is None  # taken out while the firing works on it
    for number in range(4):
        kept.put(("step", number), number, number, 4)
    assert len(kept) == 2  # bounded by size, least recently used out first
    assert kept.take(("step", 3), 3) == 3 and kept.take(("step", 0), 0) is None

"""The columnar engine (transforms/columnar_windows.py) against `KeyHistory`,
one history per key value, bit for bit: random streams of several key values
(composite ones too), ties on time and on id, -0.0, subnormals, values that
need the exact path, None values; and any bucketing of a history, as the
batch path cuts it."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.scan_engine import bits
from tests.test_window_engine import FEATURES
from transforms.bounded_features import answer_chunks, buckets_of, pack_slims
from transforms.columnar_windows import answer_events
from transforms.feature_layout import FeatureGroup
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent
from transforms.spec import WindowedFeature

MIN = 60_000_000
SERIES = KeyHistory(FEATURES).series
KEYS = ("N1", "N2", "N3", ("EWR", "ORD"), ("JFK", "ORD"), "")

_numbers = st.one_of(
    st.none(), st.integers(-500, 500), st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.sampled_from([0.0, -0.0, 0.1, 0.25, -0.5, 1e-300, 5e-324, 2.2250738585072014e-308, 123456.789, 7.0, 7,
                     2 ** 53 + 1, -(2 ** 60), 1e15 + 0.5]))
_whole = st.one_of(st.none(), st.integers(-1440, 2880).map(float), st.sampled_from([0.0, -0.0]))
_times = st.one_of(st.integers(0, 24).map(lambda q: q * 15 * MIN),  # a 15 min grid: ties and window edges
                   st.integers(0, 6 * 60 * MIN))
_event = st.tuples(st.sampled_from(KEYS), st.booleans(), _times,
                   st.one_of(st.none(), st.sampled_from("ABC"), st.sampled_from([1.0, 1, -0.0, 0.0])),
                   st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5, -1.0, -0.0, 0.1])),
                   st.integers(0, 40))  # the id: ties on time broken by it, repeats too


def _events(drawn, delays):
    out = []
    for index, ((key, is_request, time_us, dest, weight, tag), delay) in enumerate(zip(drawn, delays)):
        event_id = f"{tag:03d}-{index % 3}"  # repeats across keys and ranks, in an order unrelated to time
        if is_request:
            out.append((key, event_id, REQUEST, time_us, ()))
        else:
            row = {"delay": delay, "dest": dest, "weight": weight}
            values = tuple(row[s[0]] if len(s) == 1 else (None if None in (row[s[0]], row[s[1]])
                                                          else (row[s[0]], row[s[1]])) for s in SERIES)
            out.append((key, event_id, OBSERVATION, time_us, values))
    return out


def _by_history(features, events):
    """The reference: one KeyHistory per key value, as the engine has always answered."""
    by_key = {}
    for key, event_id, rank, time_us, values in events:
        by_key.setdefault(key, []).append(PendingEvent(time_us, rank, event_id, values))
    out = []
    for pending in by_key.values():
        answers, _, _ = KeyHistory(features).apply(pending)
        out.extend((request.event_id, request.time_us, answer) for request, answer in answers)
    return out


def _canonical(answers):
    """Answers as a sorted list, floats by their bits; by repr, as an id may repeat with None in its answer."""
    return sorted(((event_id, bits(answer)) for event_id, *_, answer in answers), key=repr)


@settings(max_examples=300, deadline=None)
@given(drawn=st.lists(_event, max_size=80), data=st.data(), whole=st.booleans())
def test_equals_key_history_bit_for_bit(drawn, data, whole):
    """Whole numbers take the int64 prefix sums; any other value the exact path."""
    delays = data.draw(st.lists(_whole if whole else _numbers, min_size=len(drawn), max_size=len(drawn)))
    events = _events(drawn, delays)
    assert _canonical(answer_events(FEATURES, events)) == _canonical(_by_history(FEATURES, events))


@settings(max_examples=100, deadline=None)
@given(drawn=st.lists(_event, max_size=80), data=st.data(), span_min=st.sampled_from([30, 60, 180, 400]))
def test_any_bucketing_answers_as_the_whole_history(drawn, data, span_min):
    """Cut into buckets as the batch path cuts them (an observation copied into
    every later bucket whose requests can see it), answered bucket by bucket."""
    delays = data.draw(st.lists(_whole, min_size=len(drawn), max_size=len(drawn)))
    events = _events(drawn, delays)
    horizon_us = max(f.window_s for f in FEATURES) * 1_000_000
    buckets = {}
    for event in events:
        for bucket in buckets_of(event[3], event[2], horizon_us, span_min * MIN):
            buckets.setdefault(bucket, []).append(event)
    answered = [answer for bucket in buckets.values() for answer in answer_events(FEATURES, bucket)]
    assert _canonical(answered) == _canonical(_by_history(FEATURES, events))


def test_a_busy_shard_of_many_keys_equals_key_history():
    """Thousands of events over hundreds of key values: long sparse tables, windows of every size."""
    rng = random.Random(7)
    events = []
    for index in range(6000):
        key = f"K{rng.randint(0, 300)}" if rng.random() < 0.8 else "HOT"
        time_us = rng.randint(0, 30 * 3600) * 1_000_000
        if rng.random() < 0.4:
            events.append((key, f"r{index:05d}", REQUEST, time_us, ()))
        else:
            row = {"delay": rng.choice([None, float(rng.randint(-20, 300)), -0.0]),
                   "dest": rng.choice([None, "A", "B", "C", "D"]), "weight": rng.choice([None, 1.0, 2.5])}
            values = tuple(row[s[0]] if len(s) == 1 else (None if None in (row[s[0]], row[s[1]])
                                                          else (row[s[0]], row[s[1]])) for s in SERIES)
            events.append((key, f"o{index:05d}", OBSERVATION, time_us, values))
    assert _canonical(answer_events(FEATURES, events)) == _canonical(_by_history(FEATURES, events))


def test_a_group_of_counts_only_and_an_empty_batch():
    counts = (WindowedFeature("n_1h", ("origin",), "count", 3600),
              WindowedFeature("since", ("origin",), "time_since_last", 3600))
    events = [("EWR", "b", OBSERVATION, 10 * MIN, ()), ("EWR", "a", REQUEST, 10 * MIN, ()),
              ("EWR", "c", REQUEST, 11 * MIN, ()), ("JFK", "d", REQUEST, 11 * MIN, ())]
    assert sorted(answer_events(counts, events)) == [("a", (0.0, None)), ("c", (1.0, 60.0)), ("d", (0.0, None))]
    assert answer_events(counts, []) == []


_GROUP = FeatureGroup("tailnum", "observation", ("tailnum",), FEATURES, tuple(range(len(FEATURES))), OBSERVATION,
                      ((0,), (0,)), tuple((i,) for i in range(len(SERIES))), True, True)


@settings(max_examples=150, deadline=None)
@given(drawn=st.lists(_event, max_size=80), data=st.data(), whole=st.booleans(), cuts=st.lists(st.integers(0, 80)))
def test_packed_chunks_answer_as_key_history(drawn, data, whole, cuts):
    """Through what crosses the shuffle: slims cut into chunks of one rank,
    packed (float series as float64 bytes, others as lists), answered together."""
    delays = data.draw(st.lists(_whole if whole else _numbers, min_size=len(drawn), max_size=len(drawn)))
    events = _events(drawn, delays)
    bounds = [0, *sorted(c for c in cuts if c < len(events)), len(events)]
    chunks = []
    for a, b in zip(bounds, bounds[1:]):
        for rank in (REQUEST, OBSERVATION):
            part = [e for e in events[a:b] if e[2] == rank]
            if part:
                series = [[e[4][at] if e[4] else None for e in part] for at in range(len(SERIES))]
                chunks.append(pack_slims(rank, [e[0] for e in part], [e[1] for e in part], [e[3] for e in part],
                                         series if rank == OBSERVATION else []))
    event_ids, _, answers = answer_chunks(_GROUP, chunks) if chunks else ([], [], [])
    assert _canonical(zip(event_ids, answers)) == _canonical(_by_history(FEATURES, events))

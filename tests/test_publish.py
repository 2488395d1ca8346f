"""The publisher: order, selection, pacing, rebasing and messages as pure functions;
the publishing loop with a fake clock and fake futures; one run against the real
Pub/Sub emulator (slow, the shared `pubsub_emulator` fixture of tests/emulators.py)."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import Future

import pytest

from beam_app import publish
from beam_app.pubsub import publisher, replay
from beam_app.adapters import load_adapters
from beam_app.common.errors import UsageError
from beam_app.pubsub.replay import Pacing
from tests.conftest import HOUR_US, MIN_US, observation, request
from tests.emulators import wait_until
from transforms.events import RawRecord, event_from_json, rfc3339_to_time_us
from transforms.parse import RecordParser
from transforms.point_in_time import OBSERVATION, REQUEST, PendingEvent

T0 = 1_357_027_200_000_000  # 2013-01-01T08:00:00Z
FLIGHTS_HEADER = ("year,month,day,dep_time,sched_dep_time,dep_delay,arr_time,sched_arr_time,arr_delay,carrier,"
                  "flight,tailnum,origin,dest,air_time,distance,hour,minute,time_hour")


def _ids(events) -> list[tuple[str, str]]:
    return [(e.event_id, e.role) for e in events]


def test_order_is_the_engines_time_then_requests_then_id():
    events = [observation("20130101-UA2-EWR", T0, 5.0), request("20130101-UA2-EWR", T0),
              request("20130101-UA1-EWR", T0), observation("20130101-UA9-EWR", T0 - MIN_US, 1.0)]
    selected = replay.select(events).events
    assert _ids(selected) == [("20130101-UA9-EWR", "observation"), ("20130101-UA1-EWR", "request"),
                              ("20130101-UA2-EWR", "request"), ("20130101-UA2-EWR", "observation")]
    pending = sorted(events, key=lambda e: PendingEvent(
        e.time_us, REQUEST if e.role == "request" else OBSERVATION, e.event_id, ()).order())
    assert selected == pending


def test_start_time_is_inclusive_and_limit_counts_after_it():
    events = [request(f"20130101-UA{i}-EWR", T0 + i * MIN_US) for i in (5, 1, 4, 2, 3)]
    selection = replay.select(events, start_us=T0 + 2 * MIN_US, limit=2)
    assert [e.event_id for e in selection.events] == ["20130101-UA2-EWR", "20130101-UA3-EWR"]
    assert (selection.before_start, selection.beyond_limit) == (1, 2)
    assert replay.select(events, limit=0) == ([], 0, 5)


def test_schedule_under_rate_speedup_and_as_fast_as_possible():
    events = [request(f"20130101-UA{i}-EWR", T0 + minutes * MIN_US) for i, minutes in enumerate((0, 1, 1, 3))]
    due = lambda pacing: [p.due_us for p in replay.schedule(events, pacing)]  # noqa: E731
    assert due(Pacing(rate=4)) == [0, 250_000, 500_000, 750_000]
    assert due(Pacing(speedup=60)) == [0, 1_000_000, 1_000_000, 3_000_000]  # a minute of events per second
    assert due(Pacing(rate=0)) == [0, 0, 0, 0]
    assert [p.event for p in replay.schedule(events, Pacing())] == events


def test_rebase_gives_whole_milliseconds_from_now_in_the_same_order():
    origin_us = 1_700_000_000_123_456  # rounds to ...123 ms
    events = [request("20130101-UA1-EWR", T0), observation("20130101-UA9-EWR", T0 + MIN_US, 2.0),
              request("20130101-UA3-EWR", T0 + HOUR_US)]
    paced = list(replay.rebase(replay.schedule(events, Pacing(rate=4)), origin_us))
    assert [p.event.time_us for p in paced] == [1_700_000_000_123_000, 1_700_000_000_373_000, 1_700_000_000_623_000]
    assert [p.due_us for p in paced] == [0, 250_000, 500_000]
    assert [p.event._replace(time_us=0) for p in paced] == [e._replace(time_us=0) for e in events]

    # Due 0.33 ms apart: rounding puts all three in ms 123; later original times step 1 ms.
    fast = [p.event for p in replay.rebase(replay.schedule(events, Pacing(rate=3000)), origin_us)]
    assert [e.time_us // 1000 - 1_700_000_000_000 for e in fast] == [123, 124, 125]


def test_rebase_keeps_ties_tied_and_the_order_intact():
    # A tie at T0 (a request sorts before an observation) and a later event, all due at once.
    events = replay.select([observation("20130101-UA1-EWR", T0, 3.0), request("20130101-UA1-EWR", T0),
                             request("20130101-UA2-EWR", T0 + MIN_US)]).events
    rebased = [p.event for p in replay.rebase(replay.schedule(events, Pacing(rate=0)), 1_700_000_000_000_000)]
    assert [e.time_us for e in rebased] == [1_700_000_000_000_000, 1_700_000_000_000_000, 1_700_000_000_001_000]
    assert replay.select(rebased).events == rebased


def test_message_attributes_match_the_payload_and_parse_back(flights_spec):
    event = request("20130101-UA1545-EWR", 1_700_000_000_123_000, label=2.0)
    message = replay.build_message(event)
    assert message.attributes == {"event_time": "2023-11-14T22:13:20.123000Z", "event_id": "20130101-UA1545-EWR",
                                  "role": "request", "message_key": "20130101-UA1545-EWR/request"}
    payload = json.loads(message.data)
    assert payload["event_time"] == message.attributes["event_time"]
    assert RecordParser(flights_spec)(RawRecord("pubsub:1", message.data.decode(), "json")) == [event]


def test_records_that_do_not_parse_are_counted_with_their_reasons(flights_spec):
    header = tuple(FLIGHTS_HEADER.split(","))
    lines = ["2013,11,1,600,600,3,900,900,1,UA,9999,N1,EWR,ORD,100,700,6,0,2013-11-01T11:00:00Z",
             "2013,11,1,NA,600,NA,NA,900,NA,UA,9998,N1,EWR,ORD,NA,700,6,0,2013-11-01T11:00:00Z",  # cancelled
             "2013,11,1,600,600,3,900,900,1,UA,9997,N1,BOS,ORD,100,700,6,0,2013-11-01T11:00:00Z",
             "2013,11,1,600,600,3,900"]
    records = [RawRecord(f"f.csv:{n}", line, "csv", header) for n, line in enumerate(lines, start=2)]
    loaded = replay.load_events(records, RecordParser(flights_spec, load_adapters(flights_spec)))
    assert (loaded.records, loaded.dead_letters, len(loaded.events)) == (4, 2, 3)
    assert loaded.first_reasons[0].startswith("f.csv:4: origin: unknown value 'BOS'")
    assert loaded.first_reasons[1].startswith("f.csv:5: expected 19 CSV columns")


class FakeTime:
    """A clock that only moves when the publisher sleeps."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


def _done(error: Exception | None = None) -> Future:
    future = Future()
    future.set_exception(error) if error else future.set_result("message-id")
    return future


def test_the_loop_paces_counts_failures_and_records_only_what_was_published():
    events = [request(f"20130101-UA{i}-EWR", T0 + i * MIN_US) for i in range(3)]
    fake, record = FakeTime(), io.BytesIO()
    outcomes = iter([None, RuntimeError("quota"), None])
    stats = publisher.publish_all(replay.schedule(events, Pacing(rate=2)), lambda message: _done(next(outcomes)),
                                clock=fake.clock, sleep=fake.sleep, record=record)
    assert fake.sleeps == [0.5, 0.5]
    assert (stats.sent, stats.published, stats.failed, stats.stopped) == (3, 2, 1, None)
    assert stats.first_reasons == ["20130101-UA1-EWR/request: RuntimeError('quota')"]
    assert record.getvalue().decode().splitlines() == [
        replay.build_message(events[i]).data.decode() for i in (0, 2)]
    assert (stats.first_time_us, stats.last_time_us, stats.seconds) == (T0, T0 + 2 * MIN_US, 1.0)


def test_the_loop_stops_after_failures_in_a_row_and_the_rest_is_skipped():
    events = [request(f"20130101-UA{i}-EWR", T0 + i * MIN_US) for i in range(10)]
    fake = FakeTime()
    stats = publisher.publish_all(replay.schedule(events, Pacing(rate=0)), lambda m: _done(PermissionError("gone")),
                                clock=fake.clock, sleep=fake.sleep, max_consecutive_failures=3)
    assert (stats.sent, stats.failed, stats.stopped) == (3, 3, "3 publish failures in a row")
    loaded = replay.Loaded(events, 10, 0, [])
    summary = publish.summarize(loaded, replay.select(events), stats)
    assert (summary["published"], summary["failed"], summary["skipped"]) == (0, 3, 7)
    assert all(summary["checks"].values())


class LazyFuture(Future):
    """Finishes only when someone waits for it, like a batch not yet sent."""

    def result(self, timeout=None):
        if not self.done():
            self.set_result("message-id")
        return super().result(timeout)


def test_the_loop_keeps_a_bounded_number_of_messages_unsettled():
    events = [request(f"20130101-UA{i}-EWR", T0 + i * MIN_US) for i in range(20)]
    futures: list[Future] = []

    def send(message):
        assert sum(not f.done() for f in futures) <= 4
        futures.append(LazyFuture())
        return futures[-1]

    fake = FakeTime()
    stats = publisher.publish_all(replay.schedule(events, Pacing(rate=0)), send, clock=fake.clock, sleep=fake.sleep,
                                max_outstanding=4)
    assert (stats.sent, stats.published) == (20, 20)


def test_progress_line_says_count_rate_and_event_time():
    fake = FakeTime()
    progress = publisher.Progress(1000, io.StringIO(), fake.clock)
    fake.now += 2.0
    stats = publisher.PublishStats(sent=520, published=500, last_time_us=T0, lag_s=1.5)
    assert progress.line(stats) == ("published 500 of 1,000  failed 0  250 msg/s  event time 2013-01-01T08:00:00Z"
                                    "  behind schedule 1.5 s")


@pytest.mark.parametrize("topic,project,expected", [
    ("projects/p-1/topics/flights", None, "projects/p-1/topics/flights"),
    ("projects/p-1/topics/flights", "p-1", "projects/p-1/topics/flights"),
    ("flights", "p-1", "projects/p-1/topics/flights"),
])
def test_topic_path(topic, project, expected):
    assert publisher.topic_path(topic, project) == expected


@pytest.mark.parametrize("topic,project,reason", [
    ("flights", None, "is a short name: add --project"),
    ("projects/p-1/topics/flights", "p-2", "is in project 'p-1', not --project 'p-2'"),
    ("topics/flights", "p-1", "give projects/PROJECT/topics/TOPIC"),
    ("fl", "p-1", "3-255 letters"),
    ("google-events", "p-1", "not with 'goog'"),
    ("flights", "my project", "without slashes or spaces"),
])
def test_topic_path_refuses_with_what_to_do(topic, project, reason):
    with pytest.raises(UsageError, match=reason):
        publisher.topic_path(topic, project)


def test_flags():
    args = publish.parse_args(["--topic", "projects/p/topics/flights"])
    assert (args.pacing, args.start_us, args.limit, args.rebase_to_now) == (Pacing(rate=100), None, None, False)
    args = publish.parse_args(["--topic", "flights", "--project", "p", "--speedup", "3600",
                               "--start", "2013-06-01T12:00:00"])
    assert (args.topic_path, args.pacing, args.start_us) == ("projects/p/topics/flights", Pacing(speedup=3600),
                                                              1_370_088_000_000_000)
    assert publish.parse_args(["--topic", "projects/p/topics/fast", "--rate", "0"]).pacing == Pacing(rate=0)


@pytest.mark.parametrize("argv,reason", [
    (["--rate", "5", "--speedup", "2"], "not allowed with argument"),
    (["--rate", "-1"], "--rate: events per second, 0 or more"),
    (["--speedup", "0"], "--speedup: a factor above 0"),
    (["--limit", "-3"], "--limit: 0 or more events"),
    (["--start", "June"], "--start: expected a UTC date"),
    (["--strat", "2013-06-01"], "unknown flag --strat; did you mean --start?"),
    (["--limit", "3", "extra"], "unexpected argument 'extra'"),
])
def test_bad_flags_exit_with_a_usage_message(capsys, argv, reason):
    with pytest.raises(SystemExit) as exit_:
        publish.parse_args(["--topic", "projects/p/topics/flights", *argv])
    assert exit_.value.code == 2
    assert reason in capsys.readouterr().err


@pytest.mark.slow
def test_replay_to_the_emulator_arrives_complete_and_as_recorded(pubsub_emulator, flights_spec, tmp_path):
    from google.cloud import pubsub_v1

    from tests.flights_slice import flights_lines, slice_events

    lines = flights_lines(lambda month, day: (month, day) == (1, 1))
    source = tmp_path / "jan1.csv"
    source.write_text("\n".join(lines + ["2013,1,1,600,600,3,900"]) + "\n")
    expected = replay.select(slice_events(flights_spec, lines), limit=200).events
    topic, subscription = "projects/local/topics/replay", "projects/local/subscriptions/replay-check"
    publisher.ensure_topic(pubsub_v1.PublisherClient(), topic, create=True)  # messages need the subscription first
    subscriber = pubsub_v1.SubscriberClient()
    subscriber.create_subscription(name=subscription, topic=topic)

    recorded = tmp_path / "published.ndjson"
    started_us = int(time.time() * 1e6)
    summary = publish.run(["--topic", topic, "--create_topic", "--input", str(source), "--limit", "200",
                           "--rebase_to_now", "--rate", "0", "--record", str(recorded)])
    assert (summary["published"], summary["failed"], summary["skipped"], summary["dead_letters"]) == (200, 0, 0, 1)
    assert all(summary["checks"].values())

    received = []

    def pull() -> bool:
        response = subscriber.pull(subscription=subscription, max_messages=500, timeout=10)
        received.extend(m.message for m in response.received_messages)
        if response.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
        return len(received) >= 200

    wait_until(pull, 60, "the 200 published messages", progress=lambda: len(received))
    assert len(received) == 200

    events = []
    for message in received:
        event = event_from_json(message.data.decode())
        attributes = dict(message.attributes)
        assert attributes == {"event_time": json.loads(message.data)["event_time"], "event_id": event.event_id,
                              "role": event.role, "message_key": f"{event.event_id}/{event.role}"}
        assert rfc3339_to_time_us(attributes["event_time"]) == event.time_us
        events.append(event)
    assert all(e.time_us % 1000 == 0 and abs(e.time_us - started_us) < 120_000_000 for e in events)
    assert len({(e.event_id, e.role) for e in events}) == 200

    # The record is what arrived, in publish order, which is also the event-time order;
    # un-rebased, it is the slice's first 200 events.
    record = recorded.read_text().splitlines()
    assert sorted(record) == sorted(m.data.decode() for m in received)
    in_record = [event_from_json(line) for line in record]
    assert replay.select(in_record).events == in_record
    assert sorted(events, key=replay.publish_order) == in_record
    assert _ids(in_record) == _ids(expected)
    parse = RecordParser(flights_spec)
    assert [parse(RawRecord("record", line, "json"))[0].fields for line in record] == [e.fields for e in expected]

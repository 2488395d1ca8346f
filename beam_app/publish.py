"""Replay events to a Pub/Sub topic, in event-time order, for the streaming job.

Reads events the way the batch job does (the spec's embedded data set by
default, or --input: CSV through the spec's adapter, or NDJSON events), sorts
them in the engine's processing order (event time, requests before
observations at equal times, then event_id) and publishes one message per
event: the data is the event's JSON line, the attributes are `event_time`
(the streaming job's timestamp attribute, equal to the payload's),
`event_id`, `role` and `message_key` (`<event_id>/<role>`, unique: an id_label
for de-duplication). Records that do not parse are counted, not published.

The streaming job judges an event's time against its publish time (its
watermark follows publish times, on the DirectRunner and on Dataflow alike),
so replays to it need --rebase_to_now: each event's time becomes the moment
it is scheduled to be published (whole milliseconds, as Pub/Sub timestamps
are kept), order intact. Without it event times are kept: the job then takes
the observations as late history and refuses the requests as beyond its
allowed lateness (dead letters), which is what a live job should do with
them. Score history with the batch branch instead.

--record writes exactly what was published, one JSON line per message in
publish order; the batch job on that file is the reference streaming must
match: python -m beam_app.batch --input FILE --input_format json

Replay a day to the emulator (PUBSUB_EMULATOR_HOST=127.0.0.1:8085), as fast as possible:

    python -m beam_app.publish --topic projects/local/topics/flights --create_topic \\
        --start 2013-06-01 --limit 2000 --rate 0 --rebase_to_now --record sent.ndjson

Replay a month to real Pub/Sub, an hour of flights per second, as if live:

    python -m beam_app.publish --project my-project --topic flights --start 2013-06-01 \
        --speedup 3600 --rebase_to_now
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import Future
from typing import IO, Callable, Iterable, Iterator, NamedTuple, Optional

import google.auth.exceptions
from apache_beam.io.filesystems import FileSystems
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.cloud import pubsub_v1

from beam_app.adapters import load_adapters
from beam_app.common.inputs import add_input_arguments, resolve_inputs
from beam_app.common.errors import EXIT_CHECK_FAILED, EXIT_USAGE, UsageError
from beam_app.common.options import ArgumentParser, CommonOptions, configure_logging, quiet_tensorflow
from beam_app.common.times import TIME_HELP, time_flag_us
from transforms.events import Event, InvalidRecord, RawRecord, event_to_json, time_us_to_rfc3339
from transforms.parse import RecordParser
from transforms.point_in_time import OBSERVATION, REQUEST
from transforms.read_files import matched_files, read_records
from transforms.spec import SpecError, load_spec

PROG = "python -m beam_app.publish"
DEFAULT_RATE = 100.0
_PROJECT = r"[^/\s]+"
_TOPIC = re.compile(rf"^projects/(?P<project>{_PROJECT})/topics/(?P<topic>[^/\s]+)$")
# Pub/Sub's rule for topic ids: 3-255 characters, a leading letter, not starting with "goog".
_TOPIC_ID = re.compile(r"^(?!goog)[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}$")
_FIRST_REASONS = 5
# Topic checks give up after 20 s, not the client's default minutes (emulator not running?).
_ADMIN_RETRY = Retry(initial=0.25, maximum=2.0, timeout=20.0)
# Up to 1000 messages per request (the client alone: ~16k msg/s to the emulator here,
# ~13k with its default 100). 50 ms is the most a message waits for its batch.
_BATCH_SETTINGS = pubsub_v1.types.BatchSettings(max_messages=1000, max_bytes=1_000_000, max_latency=0.05)


class Pacing(NamedTuple):
    """When events go out: `speedup` divides event-time gaps; otherwise `rate`
    events per second, evenly spaced; rate 0 is as fast as possible."""

    rate: float = DEFAULT_RATE
    speedup: Optional[float] = None

    def describe(self) -> str:
        if self.speedup:
            return f"event-time gaps / {self.speedup:g}"
        return f"{self.rate:g} events/s" if self.rate else "as fast as possible"


class Loaded(NamedTuple):
    events: list[Event]
    records: int
    dead_letters: int
    first_reasons: list[str]  # "source: reason" of the first few dead letters


class Selection(NamedTuple):
    events: list[Event]  # in publish order
    before_start: int  # dropped by --start
    beyond_limit: int  # dropped by --limit


class Planned(NamedTuple):
    event: Event  # as it will be published (rebased or not)
    due_us: int  # when to send it, microseconds after the first one


class Message(NamedTuple):
    data: bytes
    attributes: dict[str, str]


@dataclasses.dataclass
class PublishStats:
    sent: int = 0
    published: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    first_reasons: list[str] = dataclasses.field(default_factory=list)
    first_time_us: Optional[int] = None  # event times of the published messages
    last_time_us: Optional[int] = None
    lag_s: float = 0.0  # how far behind its schedule the last send was
    stopped: Optional[str] = None  # why sending stopped before the end, if it did
    seconds: float = 0.0


def publish_order(event: Event) -> tuple[int, int, str]:
    """The streaming engine's processing order (PendingEvent.order): time, requests
    before observations at equal times, then event_id."""
    return event.time_us, REQUEST if event.role == "request" else OBSERVATION, event.event_id


def load_events(records: Iterable[RawRecord], parse: Callable[[RawRecord], list[Event]]) -> Loaded:
    """Every record through the batch job's parser; those that fail are counted with
    their first reasons (a record fails whole, like a dead letter in batch)."""
    events: list[Event] = []
    count = dead = 0
    reasons: list[str] = []
    for count, record in enumerate(records, start=1):
        try:
            events.extend(parse(record))
        except (InvalidRecord, ValueError) as err:
            dead += 1
            if len(reasons) < _FIRST_REASONS:
                reasons.append(f"{record.source}: {err}")
        if count % 100_000 == 0:
            logging.info("loading: %d records, %d events", count, len(events))
    return Loaded(events, count, dead, reasons)


def select(events: list[Event], start_us: Optional[int] = None, limit: Optional[int] = None) -> Selection:
    """The events at or after `start_us`, in publish order, the first `limit` of them."""
    kept = [e for e in events if e.time_us >= start_us] if start_us is not None else list(events)
    kept.sort(key=publish_order)
    selected = kept[:limit] if limit is not None else kept
    return Selection(selected, len(events) - len(kept), len(kept) - len(selected))


def schedule(events: Iterable[Event], pacing: Pacing) -> Iterator[Planned]:
    """Each event with its due time: under --speedup its event-time gap to the first
    event divided by the factor, under --rate i/rate seconds, under rate 0 at once."""
    first_us: Optional[int] = None
    for index, event in enumerate(events):
        if pacing.speedup:
            first_us = event.time_us if first_us is None else first_us
            due_us = round((event.time_us - first_us) / pacing.speedup)
        else:
            due_us = round(index * 1_000_000 / pacing.rate) if pacing.rate else 0
        yield Planned(event, due_us)


def rebase(planned: Iterable[Planned], origin_us: int) -> Iterator[Planned]:
    """Event time := origin + due time, in whole milliseconds (Pub/Sub timestamps
    are). Where rounding would give an event the millisecond of an earlier event
    with an earlier original time, it moves 1 ms later, so publish order and
    event-time order stay the same (only when events are due under 1 ms apart)."""
    origin_ms = (origin_us + 500) // 1000
    previous: Optional[tuple[int, int]] = None  # (original time, rebased ms) of the last event
    for event, due_us in planned:
        time_ms = origin_ms + (due_us + 500) // 1000
        if previous is not None:
            original, last_ms = previous
            time_ms = max(time_ms, last_ms if event.time_us == original else last_ms + 1)
        previous = (event.time_us, time_ms)
        yield Planned(event._replace(time_us=time_ms * 1000), due_us)


def build_message(event: Event) -> Message:
    """The payload is the event's JSON line; `event_time` is the same string as in it."""
    return Message(event_to_json(event).encode("utf-8"), {
        "event_time": time_us_to_rfc3339(event.time_us),
        "event_id": event.event_id,
        "role": event.role,
        "message_key": f"{event.event_id}/{event.role}",
    })


def topic_path(topic: str, project: Optional[str] = None) -> str:
    """--topic projects/P/topics/T, or a short name with --project -> projects/P/topics/T."""
    match = _TOPIC.match(topic)
    if match:
        if project and project != match["project"]:
            raise UsageError(f"--topic {topic} is in project {match['project']!r}, not --project {project!r}: "
                             "drop one of them")
        project, topic = match["project"], match["topic"]
    elif "/" in topic:
        raise UsageError(f"--topic {topic!r}: give projects/PROJECT/topics/TOPIC or a short topic name")
    elif not project:
        raise UsageError(f"--topic {topic!r} is a short name: add --project, or give projects/PROJECT/topics/{topic}")
    elif not re.fullmatch(_PROJECT, project):
        raise UsageError(f"--project {project!r}: a project id, without slashes or spaces")
    if not _TOPIC_ID.match(topic):
        raise UsageError(f"topic id {topic!r}: 3-255 letters, digits or -_.~+%, starting with a letter "
                         "(and not with 'goog')")
    return f"projects/{project}/topics/{topic}"


class Progress:
    """One updating line on a terminal, a log line every `every_s` otherwise."""

    def __init__(self, total: int, stream: IO[str], clock: Callable[[], float], every_s: Optional[float] = None):
        self._total, self._stream, self._clock = total, stream, clock
        self._tty = stream.isatty()
        self._every_s = every_s if every_s is not None else (0.25 if self._tty else 10.0)
        self._started = self._last = clock()

    def line(self, stats: PublishStats) -> str:
        elapsed = max(self._clock() - self._started, 1e-9)
        reached = time_us_to_rfc3339(stats.last_time_us) if stats.last_time_us is not None else "-"
        text = (f"published {stats.published:,} of {self._total:,}  failed {stats.failed:,}  "
                f"{stats.published / elapsed:,.0f} msg/s  event time {reached}")
        return text + (f"  behind schedule {stats.lag_s:.1f} s" if stats.lag_s >= 1 else "")

    def show(self, stats: PublishStats, final: bool = False) -> None:
        now = self._clock()
        if not final and now - self._last < self._every_s:
            return
        self._last = now
        if self._tty:
            self._stream.write("\r\x1b[2K" + self.line(stats) + ("\n" if final else ""))
            self._stream.flush()
        else:
            logging.info("%s", self.line(stats))


def publish_all(planned: Iterable[Planned], send: Callable[[Message], Future], *,
                clock: Callable[[], float], sleep: Callable[[float], None],
                record: Optional[IO[bytes]] = None, progress: Optional[Progress] = None,
                max_outstanding: int = 5000, max_consecutive_failures: int = 1000) -> PublishStats:
    """Sends each message at its due time (late ones at once) and settles the
    results in publish order: at most `max_outstanding` unsettled at a time, so
    memory stays flat. Only published messages go to `record`. Stops early on
    Ctrl-C or after `max_consecutive_failures` failures in a row (the topic is gone,
    credentials expired): the caller counts what was not sent as skipped."""
    stats = PublishStats()
    window: deque[tuple[Future, Message, int]] = deque()

    def settle(keep: int) -> None:
        """Settles finished messages, oldest first, waiting while more than `keep` are unsettled."""
        while window and (len(window) > keep or window[0][0].done()):
            future, message, time_us = window.popleft()
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - whatever one message's failure is, it is counted
                stats.failed += 1
                stats.consecutive_failures += 1
                if len(stats.first_reasons) < _FIRST_REASONS:
                    stats.first_reasons.append(f"{message.attributes['message_key']}: {err!r}")
                continue
            stats.published += 1
            stats.consecutive_failures = 0
            stats.first_time_us = time_us if stats.first_time_us is None else stats.first_time_us
            stats.last_time_us = time_us
            if record is not None:
                record.write(message.data + b"\n")

    def report() -> None:
        settle(keep=max_outstanding)
        if progress is not None:
            progress.show(stats)

    started = clock()
    try:
        for event, due_us in planned:
            while (wait_s := started + due_us / 1e6 - clock()) > 0:
                report()
                sleep(min(wait_s, 1.0))
            if due_us:  # under rate 0 nothing is due, nothing is late
                stats.lag_s = -wait_s
            message = build_message(event)
            window.append((send(message), message, event.time_us))
            stats.sent += 1
            report()
            if stats.consecutive_failures >= max_consecutive_failures:
                stats.stopped = f"{stats.consecutive_failures} publish failures in a row"
                break
    except KeyboardInterrupt:
        stats.stopped = "interrupted"
    settle(keep=0)
    stats.seconds = clock() - started
    if progress is not None:
        progress.show(stats, final=True)
    return stats


def ensure_topic(publisher: pubsub_v1.PublisherClient, topic: str, create: bool) -> None:
    """Creates the topic with --create_topic (fine if it exists); otherwise checks
    that it exists, so a typo or an unreachable emulator fails here rather than
    on every message."""
    try:
        if create:
            publisher.create_topic(name=topic, retry=_ADMIN_RETRY)
            logging.info("created topic %s", topic)
        else:
            publisher.get_topic(topic=topic, retry=_ADMIN_RETRY)
    except api_exceptions.AlreadyExists:
        logging.info("topic %s exists", topic)
    except api_exceptions.NotFound:
        raise UsageError(f"topic {topic} does not exist: pass --create_topic, or create it "
                         f"(gcloud pubsub topics create {topic.rsplit('/', 1)[-1]})") from None
    except api_exceptions.PermissionDenied:
        if create:
            raise
        # A publish-only role may not read topic metadata; publishing will tell.
    except api_exceptions.RetryError as err:
        where = os.environ.get("PUBSUB_EMULATOR_HOST") or "pubsub.googleapis.com"
        raise UsageError(f"no answer from Pub/Sub at {where} ({err.cause}): is it running and reachable? "
                         "(the emulator is used when PUBSUB_EMULATOR_HOST is set)") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, checked; adds `topic_path`, `pacing` and `start_us`. Bad flags exit
    with a usage message. Plain argparse, not PipelineOptions: this runs no pipeline,
    unknown flags must fail rather than be ignored, and Beam has its own --project."""
    parser = ArgumentParser(prog=PROG, description=__doc__)
    CommonOptions._add_argparse_args(parser)
    add_input_arguments(parser, "Events to publish")
    parser.add_argument("--topic", required=True, help="projects/PROJECT/topics/TOPIC, or a short name with --project.")
    parser.add_argument("--project", default=None, help="Google Cloud project of a short --topic name.")
    parser.add_argument("--create_topic", action="store_true", help="Create the topic if it does not exist.")
    parser.add_argument("--start", default=None, metavar="TIME",
                        help=f"Skip events before this time: {TIME_HELP}.")
    parser.add_argument("--limit", type=int, default=None, help="Publish only the first N events (after --start).")
    pacing = parser.add_mutually_exclusive_group()
    pacing.add_argument("--rate", type=float, default=None,
                        help=f"Events per second, evenly spaced (default {DEFAULT_RATE:g}); 0: as fast as possible.")
    pacing.add_argument("--speedup", type=float, default=None,
                        help="Keep the event-time gaps, divided by this factor (3600: an hour per second).")
    parser.add_argument(
        "--rebase_to_now", action="store_true",
        help="Event times become the wall-clock times the events are scheduled at (ms precision, order kept; "
             "above 1000 events/s, as with --rate 0, times step 1 ms where the order needs it and run ahead "
             "of the clock). Needed on the DirectRunner, whose watermark is the wall clock.")
    parser.add_argument("--record", default=None,
                        help="Write the published events here (NDJSON, publish order): the batch reference.")
    args = parser.parse_args(argv)
    if args.rate is not None and args.rate < 0:
        parser.error("--rate: events per second, 0 or more")
    if args.speedup is not None and args.speedup <= 0:
        parser.error("--speedup: a factor above 0")
    if args.limit is not None and args.limit < 0:
        parser.error("--limit: 0 or more events")
    args.pacing = Pacing(speedup=args.speedup) if args.speedup else Pacing(
        rate=DEFAULT_RATE if args.rate is None else args.rate)
    try:
        args.topic_path = topic_path(args.topic, args.project)
        args.start_us = time_flag_us(args.start, "--start")
    except (UsageError, SpecError) as err:
        parser.error(str(err))
    return args


def summarize(loaded: Loaded, selection: Selection, stats: PublishStats, **context) -> dict:
    """The counts a user reads, and whether they add up (nothing lost silently)."""
    selected = len(selection.events)
    skipped = selected - stats.sent
    summary = {
        "records_read": loaded.records,
        "dead_letters": loaded.dead_letters,
        "dead_letter_reasons": loaded.first_reasons,
        "events_read": len(loaded.events),
        "before_start": selection.before_start,
        "beyond_limit": selection.beyond_limit,
        "selected": selected,
        "published": stats.published,
        "failed": stats.failed,
        "skipped": skipped,  # selected but never sent: the run stopped early
        "publish_errors": stats.first_reasons,
        "stopped": stats.stopped,
        "event_time_first": None if stats.first_time_us is None else time_us_to_rfc3339(stats.first_time_us),
        "event_time_last": None if stats.last_time_us is None else time_us_to_rfc3339(stats.last_time_us),
        "publish_seconds": round(stats.seconds, 2),
        "rate_achieved": round(stats.published / stats.seconds, 1) if stats.seconds > 0 else None,
        **context,
    }
    summary["checks"] = {
        "events_read == before_start + beyond_limit + selected":
            len(loaded.events) == selection.before_start + selection.beyond_limit + selected,
        "published + failed + skipped == selected": stats.published + stats.failed + skipped == selected,
    }
    return summary


def run(argv: Optional[list[str]] = None) -> dict:
    """Loads, selects and publishes; returns the summary it prints."""
    configure_logging()
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.monotonic()
    spec = load_spec(args.spec)
    inputs = resolve_inputs(spec, args.input)
    files = [(path, i.source_name) for i in inputs for path in matched_files(i.pattern)]
    # The topic first: a wrong name or a missing emulator fails before the long load.
    publisher = pubsub_v1.PublisherClient(batch_settings=_BATCH_SETTINGS)
    ensure_topic(publisher, args.topic_path, args.create_topic)
    logging.info("loading %d file(s): %s", len(files), ", ".join(path for path, _ in files))
    loading = time.monotonic()
    # Every source's events merged: `select` puts them in event-time order.
    loaded = load_events((r for path, source in files for r in read_records(path, args.input_format, source)),
                         RecordParser(spec, load_adapters(spec)))
    selection = select(loaded.events, args.start_us, args.limit)
    gc.freeze()  # the events live to the end: collections need not scan them (+17% msg/s)
    load_seconds = time.monotonic() - loading
    logging.info("%d events read in %.1f s (%d dead letters); publishing %d to %s",
                 len(loaded.events), load_seconds, loaded.dead_letters, len(selection.events), args.topic_path)

    def send(message: Message) -> Future:
        return publisher.publish(args.topic_path, message.data, **message.attributes)

    with FileSystems.create(args.record) if args.record else contextlib.nullcontext() as record:
        planned = schedule(selection.events, args.pacing)
        if args.rebase_to_now:
            planned = rebase(planned, origin_us=round(time.time() * 1e6))
        stats = publish_all(planned, send, clock=time.monotonic, sleep=time.sleep, record=record,
                            progress=Progress(len(selection.events), sys.stderr, time.monotonic))
    publisher.stop()
    gc.unfreeze()
    summary = summarize(
        loaded, selection, stats, topic=args.topic_path, spec=spec.name, input=[path for path, _ in files],
        pacing=args.pacing.describe(), rebased=args.rebase_to_now, load_seconds=round(load_seconds, 1),
        seconds=round(time.monotonic() - started, 1), record=args.record)
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    skipped = f"  skipped             {summary['skipped']:>9,}"
    times = f"  event times         {summary['event_time_first']} .. {summary['event_time_last']}"
    lines = [
        f"publish finished in {summary['seconds']} s (loading {summary['load_seconds']} s)",
        f"  topic               {summary['topic']}",
        f"  records read        {summary['records_read']:>9,}   dead letters {summary['dead_letters']:,}",
        *(f"      {reason}" for reason in summary["dead_letter_reasons"]),
        (f"  events read         {summary['events_read']:>9,}   before --start "
         f"{summary['before_start']:,}, beyond --limit {summary['beyond_limit']:,}"),
        f"  selected            {summary['selected']:>9,}",
        (f"  published           {summary['published']:>9,}   at {summary['rate_achieved'] or 0:,.0f} msg/s "
         f"in {summary['publish_seconds']} s ({summary['pacing']})"),
        f"  failed              {summary['failed']:>9,}",
        *(f"      {reason}" for reason in summary["publish_errors"]),
        skipped + (f"   stopped: {summary['stopped']}" if summary["stopped"] else ""),
        times + ("   (rebased to now)" if summary["rebased"] else ""),
        f"  record              {summary['record'] or '-'}",
    ]
    failed = [name for name, ok in summary["checks"].items() if not ok]
    lines.append("  counts add up       yes" if not failed else f"  COUNTS DO NOT ADD UP: {failed}")
    print("\n".join(lines), flush=True)


def main() -> None:
    quiet_tensorflow()
    try:
        summary = run(sys.argv[1:])
    except (SpecError, FileNotFoundError, UsageError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except api_exceptions.GoogleAPIError as err:
        sys.exit(f"{PROG}: error: {err}")
    except KeyboardInterrupt:  # before publishing began (the loop reports its own interruption)
        sys.exit("interrupted: nothing was published")
    except google.auth.exceptions.DefaultCredentialsError:
        sys.exit(f"{PROG}: error: no Google Cloud credentials: run `gcloud auth application-default login`, "
                 "or set PUBSUB_EMULATOR_HOST=host:port to publish to the emulator")
    if summary["failed"] or summary["skipped"] or not all(summary["checks"].values()):
        sys.exit(EXIT_CHECK_FAILED)


if __name__ == "__main__":
    main()

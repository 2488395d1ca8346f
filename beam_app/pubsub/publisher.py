"""Sending a replay to Pub/Sub: topic names checked, the topic ensured, every
planned message sent on its schedule with progress, and what happened counted."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import deque
from concurrent.futures import Future
from typing import IO, Callable, Iterable, Optional

from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.cloud import pubsub_v1

from beam_app.common.errors import UsageError
from beam_app.pubsub.replay import FIRST_REASONS, Message, Planned, build_message
from transforms.events import time_us_to_rfc3339

_PROJECT = r"[^/\s]+"
_TOPIC = re.compile(rf"^projects/(?P<project>{_PROJECT})/topics/(?P<topic>[^/\s]+)$")
# Pub/Sub's rule for topic ids: 3-255 characters, a leading letter, not starting with "goog".
_TOPIC_ID = re.compile(r"^(?!goog)[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}$")
# Topic checks give up after 20 s, not the client's default minutes (emulator not running?).
_ADMIN_RETRY = Retry(initial=0.25, maximum=2.0, timeout=20.0)
# Up to 1000 messages per request (the client alone: ~16k msg/s to the emulator here,
# ~13k with its default 100). 50 ms is the most a message waits for its batch.
BATCH_SETTINGS = pubsub_v1.types.BatchSettings(max_messages=1000, max_bytes=1_000_000, max_latency=0.05)


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
                if len(stats.first_reasons) < FIRST_REASONS:
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

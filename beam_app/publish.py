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
import gc
import logging
import sys
import time
from concurrent.futures import Future
from typing import Optional

import google.auth.exceptions
from apache_beam.io.filesystems import FileSystems
from google.api_core import exceptions as api_exceptions
from google.cloud import pubsub_v1

from beam_app.adapters import load_adapters
from beam_app.common.inputs import add_input_arguments, resolve_inputs
from beam_app.common.errors import EXIT_CHECK_FAILED, EXIT_USAGE, UsageError
from beam_app.common.options import ArgumentParser, CommonOptions, configure_logging, quiet_tensorflow
from beam_app.common.times import TIME_HELP, time_flag_us
from beam_app.pubsub.publisher import (BATCH_SETTINGS, Progress, PublishStats, ensure_topic, publish_all,
                                       topic_path)
from beam_app.pubsub.replay import DEFAULT_RATE, Loaded, Message, Pacing, Selection, load_events, rebase, schedule, select
from transforms.events import time_us_to_rfc3339
from transforms.parse import RecordParser
from transforms.read_files import matched_files, read_records
from transforms.spec import SpecError, load_spec

PROG = "python -m beam_app.publish"
DEFAULT_RATE = 100.0
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
    publisher = pubsub_v1.PublisherClient(batch_settings=BATCH_SETTINGS)
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

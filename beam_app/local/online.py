"""Online scoring on one machine, in one command (`make serve` runs it):

1. starts the Pub/Sub, BigQuery and Bigtable emulators (beam_app.local.stack), the
   topic and the job's subscription;
2. starts the streaming job (`python -m beam_app.streaming`, DirectRunner) with the
   model `make run` trained, keeping the online store (--online_table) and the
   evidence tables;
3. publishes flights events rebased to now (`python -m beam_app.publish`), and waits
   until the store's progress reaches the last of them;
4. starts the service (`python -m beam_app.serve`) on 127.0.0.1:--port, asks it for a
   few of the published requests and prints the answers, with the curl command that
   asks for one;
5. serves until Ctrl-C (or --serve_s), then stops everything and prints the
   service's and the job's summaries.

    python -m beam_app.local.online [--model output/model] [--events 300] [--port 8080]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from beam_app.common.errors import EXIT_CHECK_FAILED
from beam_app.common.options import ArgumentParser, quiet_tensorflow
from beam_app.common.times import TIME_HELP
from beam_app.local.stack import DEFAULT_PROJECT, BigtableEmulator
from beam_app.local.streaming_stack import (SERVED_FEATURES, TOPIC, require_model, stop_job, streaming_job_command,
                                            streaming_stack)

PROG = "python -m beam_app.local.online"
ONLINE_TABLE = f"projects/{DEFAULT_PROJECT}/instances/local/tables/flights"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through an HTTP proxy


def _call(port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with _DIRECT.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _wait(condition, timeout_s: float, what: str, alive) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def run(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--model", default="output/model", help="Model directory of `make run` (default %(default)s).")
    parser.add_argument("--events", type=int, default=300, help="Flights events to publish (default %(default)s).")
    parser.add_argument("--rate", type=float, default=20, help="Events per second (default %(default)s).")
    parser.add_argument("--start", default="2013-12-02T11:00:00Z", metavar="TIME",
                        help=f"Where in 2013 the replay starts: {TIME_HELP} (default %(default)s).")
    parser.add_argument("--port", type=int, default=8080, help="The service's port on 127.0.0.1 (default %(default)s).")
    parser.add_argument("--serve_s", type=float, default=0,
                        help="Stop after serving this many seconds (default 0: until Ctrl-C).")
    parser.add_argument("--output", default="output/online",
                        help="Logs of the job and the service, and the published events (default %(default)s).")
    args = parser.parse_args(argv)
    require_model(args.model, PROG)
    work = Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print("starting the emulators and the streaming job (it keeps the online store) ...", flush=True)
    with BigtableEmulator() as bigtable:
        os.environ.update(bigtable.env)

        def job_command(model: str, endpoint: str) -> list[str]:
            return [*streaming_job_command(model, endpoint), "--online_table", ONLINE_TABLE]

        with streaming_stack(args.model, work / "streaming_job.log", job_command) as stack:
            from beam_app import publish
            from beam_app.online.bigtable_store import OnlineStore
            from beam_app.online.layout import parse_table_path
            from transforms.events import rfc3339_to_time_us

            def job_alive():
                if stack.job.poll() is not None:
                    raise RuntimeError(f"the streaming job exited: see {work / 'streaming_job.log'}")

            recorded = work / "published.ndjson"
            publish.run(["--topic", TOPIC, "--start", args.start,
                         "--limit", str(args.events), "--rate", str(args.rate), "--rebase_to_now",
                         "--record", str(recorded)])
            events = [json.loads(line) for line in recorded.read_text().splitlines()]
            last_us = max(rfc3339_to_time_us(event["event_time"]) for event in events)
            store = OnlineStore(parse_table_path(ONLINE_TABLE))
            print("waiting for the store to take every published event ...", flush=True)
            _wait(lambda: (store.through_us() or 0) >= last_us, max(120, 2 * len(events)),
                  "the online store's progress", job_alive)
            service = _start_service(args, work, stack.bigquery.endpoint)
            try:
                _show(args.port, [event for event in events if event["role"] == "request"])
                print(f"serving on http://127.0.0.1:{args.port}/v1/predict "
                      f"({'Ctrl-C stops' if not args.serve_s else f'for {args.serve_s:.0f} s'}); metrics at "
                      f"/metrics; logs in {work}/", flush=True)
                deadline = time.monotonic() + args.serve_s if args.serve_s else None
                while deadline is None or time.monotonic() < deadline:
                    if service.poll() is not None:
                        raise RuntimeError(f"the service exited: see {work / 'service.log'}")
                    job_alive()
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
            finally:
                stop_job(service)
                stop_job(stack.job)
    for log in ("service.log", "streaming_job.log"):
        text = (work / log).read_text()
        for marker in ("online scoring stopped", "streaming job stopped"):
            if marker in text:
                print(marker + text.split(marker, 1)[1], end="")
    print(f"finished in {time.monotonic() - started:.0f} s")


def _start_service(args, work: Path, bigquery_endpoint: str) -> subprocess.Popen:
    """The service, logging its answers to the job's served-features table (source = online)."""
    command = [sys.executable, "-m", "beam_app.serve", "--model", args.model, "--online_table", ONLINE_TABLE,
               "--port", str(args.port), "--served_features", SERVED_FEATURES, "--bigquery_endpoint", bigquery_endpoint]
    with open(work / "service.log", "w") as log:
        service = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def alive():
        if service.poll() is not None:
            raise RuntimeError(f"the service exited with {service.returncode}: see {work / 'service.log'}")

    def healthy() -> bool:
        try:
            return _call(args.port, "/healthz")[0] == 200
        except OSError:
            return False
    _wait(healthy, 120, "the service to answer /healthz", alive)
    return service


def _show(port: int, requests: list[dict]) -> None:
    """A few answers, and the command that asks for one."""
    shown = requests[-3:]
    status, body = _call(port, "/v1/predict", {"instances": shown})
    if status != 200:
        print(f"the service answered {status}: {body}", file=sys.stderr)
        sys.exit(EXIT_CHECK_FAILED)
    for answer in body["predictions"]:
        store = answer["store"]
        lag = "complete" if store["complete"] else f"{store['lag_s']} s behind"
        print(f"  {answer['event_id']:<24} {answer['event_time']}  prediction {answer['prediction']:7.2f} min  "
              f"model {answer['model_version']}  store {lag}")
        print("    " + ", ".join(f"{name} {value}" for name, value in answer["features"].items()))
    from transforms.spec import load_spec

    label = load_spec("flights").label.name  # the replay's requests carry it; a live caller has none
    instance = {key: value for key, value in shown[-1].items() if key != label}
    print("ask it yourself:\n  curl -s http://127.0.0.1:%d/v1/predict -H 'Content-Type: application/json' -d '%s'"
          % (port, json.dumps({"instances": [instance]})))


def _interrupt(*_):
    raise KeyboardInterrupt  # `kill` stops it as Ctrl-C does: everything it started stops too


if __name__ == "__main__":
    quiet_tensorflow()
    signal.signal(signal.SIGTERM, _interrupt)
    run()

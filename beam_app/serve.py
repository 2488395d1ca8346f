"""Online scoring over HTTP: the streaming job's features and model, answered within the caller's request.

    POST /v1/predict  {"instances": [request events, as the stream carries them]}
      -> per instance: the prediction, the model version, the spec fingerprint, the windowed
         features as of its event_time (default: now), and how far behind the store is for it
    GET /healthz, GET /metrics (Prometheus)

The features come from the online store that the streaming job keeps
(`python -m beam_app.streaming ... --online_table T`), computed by the jobs' own
engine over the observations of [t - W, t): bit for bit what batch computes for
the same history. The model is the streaming job's (--model, its spec checked,
LATEST followed). Requests are held to the stream's time rule: older than
--allowed_lateness_s or further ahead than --max_future_s is a 400. Each answer
can go to the served-features log (--served_features, source = online), which
`python -m beam_app.consistency` checks like the stream's.

    python -m beam_app.serve --model output/model \\
        --online_table projects/my-project/instances/features/tables/flights

    curl -s localhost:8080/v1/predict -d '{"instances": [{"event_id": "20131201-UA1545-EWR",
        "carrier": "UA", "origin": "EWR", "dest": "IAH", "distance": 1400, "hour": 5, "minute": 15,
        "month": 12, "day_of_week": 7, "tailnum": "N24211"}]}'

It binds 127.0.0.1 unless told otherwise (--host 0.0.0.0 in a container; on
Cloud Run, IAM decides who may call it: docs/deploy.md). BIGTABLE_EMULATOR_HOST
points it at the Bigtable emulator.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from transforms.command_line import ArgumentParser, quiet_tensorflow

PROG = "python -m beam_app.serve"


def parser() -> ArgumentParser:
    from transforms.spec import shipped_specs

    p = ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--model", required=True,
                   help="The trained model: the --model_dir of `python -m models.train` (its LATEST version serves, "
                        "and a newer one takes over), a version directory in it, or a saved_model directory.")
    p.add_argument("--online_table", required=True,
                   help="The online store the streaming job keeps: projects/<project>/instances/<instance>/"
                        "tables/<table>.")
    p.add_argument("--spec", default="flights",
                   help=f"Feature spec: a shipped spec name ({', '.join(shipped_specs())}; default flights) or a path "
                        "to a spec file. The model and the store must be of it.")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=8080, help="Port to listen on (default 8080; 0: any free port).")
    p.add_argument("--served_features", default=None,
                   help="BigQuery table of the served-features log (the streaming job's --served_features): every "
                        "answer's features as the model received them, source = online. Default: not logged.")
    p.add_argument("--bigquery_endpoint", default=None,
                   help="BigQuery API endpoint, e.g. http://127.0.0.1:9050 for the local emulator. Default: Google's.")
    p.add_argument("--allowed_lateness_s", type=int, default=3600,
                   help="A request older than this many seconds is refused (400), as the stream refuses it; the "
                        "stream's value (default 3600).")
    p.add_argument("--max_future_s", type=int, default=300,
                   help="A request more than this many seconds ahead of now is refused (400); the stream's value "
                        "(default 300).")
    p.add_argument("--model_poll_s", type=float, default=60,
                   help="How often to read the model directory's LATEST (default 60; 0: keep the version found at "
                        "start). Only when --model is a model directory.")
    p.add_argument("--store_timeout_s", type=float, default=2.0,
                   help="How long a call waits for the store before answering 503 (default 2).")
    return p


def _check(args) -> None:
    from beam_app.common.errors import UsageError
    from beam_app.online.layout import parse_table_path

    try:
        parse_table_path(args.online_table)
    except ValueError as err:
        raise UsageError(f"--online_table: {err}") from None
    if args.allowed_lateness_s < 0 or args.max_future_s < 0:
        raise UsageError("--allowed_lateness_s and --max_future_s must be 0 or more")
    if args.store_timeout_s <= 0:
        raise UsageError(f"--store_timeout_s must be above 0, got {args.store_timeout_s}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be 0 to 65535, got {args.port}")


class Service:
    """Everything the app needs, built from the flags: the scorer, its store, model and log."""

    def __init__(self, args, clock=time.time):
        from beam_app.common.errors import UsageError
        from beam_app.online.bigtable_store import OnlineStore, StoreUnavailable
        from beam_app.online.layout import parse_table_path
        from beam_app.online.scorer import OnlineScorer
        from beam_app.online.served_log_writer import ServedLogWriter
        from beam_app.online.service import Metrics, make_app
        from models.inference import ModelCheck, ServingModel, load_checked_model, locate_model
        from transforms.event_time import TimeBounds
        from transforms.spec import load_spec

        self.started = time.monotonic()
        spec = load_spec(args.spec)
        location = locate_model(args.model)
        loaded = load_checked_model(location.saved_model, spec)
        if args.model_poll_s and location.from_latest:
            serving = ServingModel(ModelCheck(args.model, spec), loaded, args.model_poll_s, clock)
            self.model = serving.model
        else:
            self.model = lambda: loaded
        self.store = OnlineStore(parse_table_path(args.online_table), args.store_timeout_s)
        try:
            stored = self.store.fingerprint()
        except StoreUnavailable as err:  # served as 503 until it answers
            logging.warning("%s; starting anyway: calls get 503 until it answers", err)
        else:
            if stored is None:
                raise UsageError(f"online store {args.online_table} holds no spec: it is made by the streaming job "
                                 "(python -m beam_app.streaming ... --online_table T --create_tables)")
            if stored != spec.fingerprint:
                raise UsageError(f"online store {args.online_table} holds the features of spec {stored[:12]}, not "
                                 f"{spec.name} ({spec.fingerprint[:12]}): give --spec the spec its stream runs")
        self.served_log = ServedLogWriter(args.served_features, args.bigquery_endpoint) if args.served_features \
            else None
        self.metrics = Metrics()
        scorer = OnlineScorer(spec, self.store, self.model, TimeBounds(args.max_future_s, args.allowed_lateness_s),
                              clock, int(clock() * 1e6), log_served=self.served_log is not None)
        self.spec = spec
        self.app = make_app(scorer, self.health, self.served_log, self.metrics)

    def health(self) -> dict:
        through_us = self.store.through_us()
        from transforms.events import time_us_to_rfc3339

        return {"model_version": self.model().version, "spec_fingerprint": self.spec.fingerprint,
                "store_complete_through": time_us_to_rfc3339(through_us) if through_us is not None else None}

    def close(self) -> None:
        """Inserts what the served-features log still holds, and lets the store's client go."""
        if self.served_log is not None:
            self.served_log.close()
        self.store.close()

    def summary(self) -> str:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for metric in self.metrics.registry.collect() for s in metric.samples}
        calls = {dict(labels).get("status"): int(v) for (name, labels), v in samples.items()
                 if name == "online_calls_total"}
        instances = int(samples.get(("online_instances_total", ()), 0))
        lines = [f"online scoring stopped after {time.monotonic() - self.started:.1f} s",
                 f"  calls               {sum(calls.values()):>9,}   "
                 + (", ".join(f"{status}: {n:,}" for status, n in sorted(calls.items())) or "none"),
                 f"  instances answered  {instances:>9,}"]
        if self.served_log is not None:
            counts = self.served_log.counts
            lines.append(f"  served features     {counts['written']:>9,}   -> {self.served_log.table}  (refused "
                         f"{counts['refused']:,}, dropped {counts['dropped']:,}, still queued "
                         f"{counts['queued'] - counts['written'] - counts['refused'] - counts['dropped']:,})")
        return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    from beam_app.common.errors import EXIT_USAGE, UsageError
    from beam_app.common.options import configure_logging

    args = parser().parse_args(argv)
    quiet_tensorflow()
    configure_logging()
    from models.export import SpecMismatch
    from transforms.spec import SpecError

    try:
        _check(args)
        service = Service(args)
    except (UsageError, SpecError, SpecMismatch, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    import uvicorn

    print(f"serving {service.spec.name} ({service.spec.fingerprint[:12]}) with model {service.model().version} on "
          f"http://{args.host}:{args.port}/v1/predict; Ctrl-C stops", flush=True)
    uvicorn.run(service.app, host=args.host, port=args.port, log_level="warning", access_log=False)
    service.close()
    print(service.summary(), flush=True)


if __name__ == "__main__":
    main()

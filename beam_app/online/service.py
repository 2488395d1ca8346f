"""The HTTP layer of online scoring (FastAPI): routes, status codes, metrics.

    POST /v1/predict   {"instances": [request events]} -> {"predictions": [...]} (scorer.py)
                       400 {"error", "instance", "field"}: a malformed call or instance
                       503 {"error"}: the online store did not answer; the next call tries again
    GET  /healthz      200 when the store answers and a model is loaded, else 503
    GET  /metrics      Prometheus text: calls by status, instances, latency, store reads and
                       lag, the model version, the served-features log's rows

Calls are parsed on the event loop and scored on one thread by scorer.Batcher:
the calls that arrive while a batch is scored are scored together next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from beam_app.online.bigtable_store import StoreUnavailable
from beam_app.online.scorer import Batcher, InstanceError, OnlineScorer
from beam_app.online.served_log_writer import ServedLogWriter

_LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several apps in one process: tests)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.calls = Counter("online_calls", "Calls to /v1/predict, by HTTP status.", ["status"],
                             registry=self.registry)
        self.instances = Counter("online_instances", "Instances answered.", registry=self.registry)
        self.errors = Counter("online_errors", "Calls refused or failed, by reason.", ["reason"],
                              registry=self.registry)
        self.latency = Histogram("online_call_seconds", "Time to answer a /v1/predict call.",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.store_reads = Counter("online_store_reads", "Reads of the online store (one per batch of calls).",
                                   registry=self.registry)
        self.batch_calls = Histogram("online_batch_calls", "How many calls were scored together, per call.",
                                     buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.store_rows = Counter("online_store_rows_read", "Rows read from the online store.",
                                  registry=self.registry)
        self.store_lag = Gauge("online_store_lag_seconds",
                               "The largest lag of the store behind the instances of the latest call.",
                               registry=self.registry)
        self.model = Gauge("online_model_info", "The model version serving (value 1).", ["version"],
                           registry=self.registry)
        self.served_log = Gauge("online_served_log_rows", "The served-features log's rows, by outcome.",
                                ["outcome"], registry=self.registry)

    def text(self, served_log: Optional[ServedLogWriter]) -> bytes:
        if served_log is not None:
            for outcome, n in served_log.counts.items():
                self.served_log.labels(outcome).set(n)
        return generate_latest(self.registry)


def make_app(scorer: OnlineScorer, health: Callable[[], dict], served_log: Optional[ServedLogWriter] = None,
             metrics: Optional[Metrics] = None):
    """The ASGI app. health() returns what /healthz shows, raising StoreUnavailable when the store is down.
    Calls are parsed on the event loop (a fraction of a millisecond) and scored by a `Batcher`."""
    metrics = metrics or Metrics()
    batcher = Batcher(scorer.score)
    app = FastAPI(title="beam_app online scoring", docs_url=None, redoc_url=None, openapi_url=None,
                  on_shutdown=[batcher.close])
    app.state.metrics = metrics
    seen_versions: set[str] = set()

    @app.post("/v1/predict")
    async def predict(request: Request):
        started = time.perf_counter()
        body = await request.body()
        try:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError) as err:
                raise InstanceError(f"the body is not JSON: {err}") from None
            events = scorer.parse(parsed)
            answers = await asyncio.wrap_future(batcher.submit(events))
        except InstanceError as err:
            metrics.errors.labels("bad_request").inc()
            return _done(metrics, started, JSONResponse(err.to_json(), status_code=400))
        except StoreUnavailable as err:
            metrics.errors.labels("store_unavailable").inc()
            logging.warning("%s", err)
            return _done(metrics, started, JSONResponse({"error": str(err)}, status_code=503))
        except Exception as err:  # noqa: BLE001 - a bug must not take the service down: 500, logged, counted
            metrics.errors.labels("internal").inc()
            logging.exception("scoring failed")
            return _done(metrics, started, JSONResponse({"error": f"internal error: {err}"}, status_code=500))
        if served_log is not None:
            served_log.add(answers.served_rows)
        metrics.instances.inc(len(events))
        metrics.batch_calls.observe(answers.batch_calls)
        if answers.rows_read:
            metrics.store_reads.inc()
            metrics.store_rows.inc(answers.rows_read)
        if answers.lag_s is not None:
            metrics.store_lag.set(answers.lag_s)
        version = answers.body["predictions"][0]["model_version"]
        if version not in seen_versions:
            for old in seen_versions:
                metrics.model.labels(old).set(0)
            seen_versions.add(version)
            metrics.model.labels(version).set(1)
        return _done(metrics, started, Response(json.dumps(answers.body, separators=(",", ":")),
                                                media_type="application/json"))

    @app.get("/healthz")
    async def healthz():
        try:
            return JSONResponse({"status": "ok", **await run_in_threadpool(health)})
        except StoreUnavailable as err:
            return JSONResponse({"status": "unavailable", "error": str(err)}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(served_log), media_type=CONTENT_TYPE_LATEST)

    return app


def _done(metrics: Metrics, started: float, response):
    metrics.latency.observe(time.perf_counter() - started)
    metrics.calls.labels(str(response.status_code)).inc()
    return response

"""What a bounded job tells its user while and after it runs: a heartbeat
while the runner is silent, and the counters it kept (Beam metrics)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from apache_beam.metrics.metric import MetricsFilter


def counters(result) -> dict[str, int]:
    """Every counter of a finished pipeline, "namespace/name" -> value (committed where the runner has it)."""
    totals: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        name = f"{counter.key.metric.namespace}/{counter.key.metric.name}"
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[name] = totals.get(name, 0) + (value or 0)
    return totals


@contextlib.contextmanager
def heartbeat(started: float, every_s: float, expected: str = ""):
    """The DirectRunner reports nothing until it is done: say that we are alive
    (`expected`: how long the job usually takes, appended in parentheses)."""
    done = threading.Event()
    hint = f" ({expected})" if expected else ""

    def beat():
        while not done.wait(every_s):
            logging.info("pipeline running, %.0f s so far%s", time.monotonic() - started, hint)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()

"""What a bounded job tells its user while and after it runs: a heartbeat
while the runner is silent, the counters it kept (Beam metrics), and its
small output files (earlier outputs cleared, JSON summaries)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Iterable

from apache_beam.io.filesystems import FileSystems
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


def clear_outputs(output: str, directories: Iterable[str], files: Iterable[str]) -> None:
    """Old shards would mix with new ones: remove a job's earlier outputs under
    `output` (the files in its `directories`, and its `files`), only those."""
    patterns = [FileSystems.join(output, d, "*") for d in directories]
    patterns += [FileSystems.join(output, f) for f in files]
    stale = [m.path for match in FileSystems.match(patterns) for m in match.metadata_list]
    if stale:
        FileSystems.delete(stale)


def write_json(path: str, body: dict) -> None:
    """A small JSON document (local or gs://), indented."""
    with FileSystems.create(path) as out:
        out.write((json.dumps(body, indent=2) + "\n").encode())

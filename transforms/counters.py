"""Every counter a job keeps and a summary reads back, named once.

A DoFn increments `COUNTER.metric()`; a summary reads `counts[COUNTER.key]`
from the finished pipeline's counters ("namespace/name" -> value). Renaming a
counter here renames it on both sides, so "the counts add up" cannot break
silently."""

from __future__ import annotations

import collections
import threading
from typing import Callable, Mapping, NamedTuple, Optional

from apache_beam.metrics import Metrics

from transforms.spec import DEFAULT_KIND, REQUEST


class Counter(NamedTuple):
    namespace: str
    name: str

    @property
    def key(self) -> str:
        """How the job report names it: "namespace/name"."""
        return f"{self.namespace}/{self.name}"

    def metric(self, tally: Optional[str] = None):
        """The Beam counter to increment (inside a DoFn); with `tally`, one that also
        counts into that process-wide tally (`tallied`)."""
        metric = Metrics.counter(self.namespace, self.name)
        return metric if tally is None else _Tallied(metric, self.key, tally)

    def of(self, counts: Mapping[str, int]) -> int:
        """Its value among a finished pipeline's counters (0 when never incremented)."""
        return counts.get(self.key, 0)


# A streaming job's own counts, per job (a token it makes), in the process that runs it. The streaming
# DirectRunner keeps a fraction of a job's Beam metrics (a counter incremented 50 times, in process()
# or in a timer callback, reads back as 1), so the local job's summary reads these instead. On Dataflow
# the job runs elsewhere and its Beam metrics are whole.
_TALLIES: dict[str, collections.Counter] = {}
_TALLY_LOCK = threading.Lock()


class _Tallied:
    """A Beam counter that also counts into a tally: inc/dec as Beam's."""

    def __init__(self, metric, key: str, tally: str):
        self._metric, self._key, self._tally = metric, key, tally

    def inc(self, n: int = 1) -> None:
        self._metric.inc(n)
        with _TALLY_LOCK:
            _TALLIES.setdefault(self._tally, collections.Counter())[self._key] += n

    def dec(self, n: int = 1) -> None:
        self.inc(-n)


def tallied(tally: str) -> dict[str, int]:
    """What has been counted into `tally` in this process so far ("namespace/name" -> n)."""
    with _TALLY_LOCK:
        return dict(_TALLIES.get(tally, {}))


def forget(tally: str) -> None:
    """Drops a finished job's tally."""
    with _TALLY_LOCK:
        _TALLIES.pop(tally, None)


# The online store (beam_app/online/write.py): what the streaming job writes for the online service.
ONLINE_OBSERVATIONS_WRITTEN = Counter("online_store", "observations_written")
ONLINE_CELLS_WRITTEN = Counter("online_store", "cells_written")
ONLINE_PROGRESS_MARKS = Counter("online_store", "progress_marks")

# Parsing (transforms/parse.py): every record read is parsed or a dead letter.
RECORDS_READ = Counter("parse", "records_read")
RECORDS_OK = Counter("parse", "records_ok")
PARSE_DEAD_LETTERS = Counter("parse", "dead_letters")
REQUESTS = Counter("parse", "requests")


def parsed(role: str) -> Counter:
    """Events of one role parsed: parse/requests, parse/observations (the one-kind
    spec's kind), or the kind's own name (parse/weather)."""
    return Counter("parse", f"{role}s" if role in (REQUEST, DEFAULT_KIND) else role)


# De-duplication (transforms/deduplicate.py): identical copies dropped, conflicting copies dead letters.
def accepted(role: str) -> Counter:
    """Live events of one role accepted by the streaming job: the first copy of each, not the warm start."""
    return Counter("accepted", role)


def duplicates(role: str) -> Counter:
    return Counter("duplicates", role)


def conflicts(role: str) -> Counter:
    return Counter("conflicts", role)


# The time range of batch and predict (transforms/time_range.py).
REQUESTS_IN_RANGE = Counter("time_range", "requests_in_range")
REQUESTS_OUTSIDE_RANGE = Counter("time_range", "requests_outside_range")
OBSERVATIONS_OUTSIDE_RANGE = Counter("time_range", "observations_outside_range")

# Features (transforms/windowed_features.py, unbounded_features.py).
FEATURE_ROWS = Counter("windowed_features", "feature_rows")
LATE_REQUESTS = Counter("windowed_features", "late_requests")
LATE_OBSERVATIONS = Counter("windowed_features", "late_observations")
# Streaming: a timer firing that found no kept history for its state key and read the log back.
HISTORIES_REBUILT = Counter("windowed_features", "histories_rebuilt")
# Streaming: key values whose feature state is held (up on a first event, down when it ends), and those ended.
LIVE_KEYS = Counter("windowed_features", "live_keys")
STATE_CLEARED = Counter("windowed_features", "state_cleared")

# Examples (transforms/examples.py, split.py, beam_app/batch.py).
EXAMPLES_ENCODED = Counter("examples", "encoded")
UNLABELED_REQUESTS = Counter("examples", "unlabeled_requests")


def split_examples(split: str) -> Counter:
    return Counter("split", f"examples_{split}")


# Predictions and what the streaming job writes.
PREDICTION_ROWS = Counter("predictions", "rows")
SERVED_FEATURES_ROWS = Counter("predictions", "served_features_rows")
EVENTS_ARCHIVED = Counter("events", "archived")
UNWRITABLE = Counter("dead_letters", "unwritable")


def dead_letters(stage: str) -> Counter:
    """Dead letters of one stage (parse, duplicate, inference, event_time, ...)."""
    return Counter("dead_letters", stage)


# BigQuery history and model updates.
BIGQUERY_ROWS_READ = Counter("bigquery_input", "rows_read")
MODEL_UPDATES_ACCEPTED = Counter("model_updates", "accepted")
MODEL_UPDATES_REFUSED = Counter("model_updates", "refused")


def bootstrap(name: str) -> Counter:
    """What the warm start read (transforms/bootstrap.py): records, unreadable, requests, older, observations."""
    return Counter("bootstrap", name)


# The consistency job (beam_app/consistency.py, verdicts from beam_app/monitoring/verdicts.py). Its counts
# are elements the job counts itself, keyed the same "namespace/name", not Beam metrics: its summary is
# written by the pipeline.
REQUESTS_LOGGED = Counter("requests", "logged")
REQUESTS_LOGGED_MORE_THAN_ONCE = Counter("requests", "logged_more_than_once")
REQUESTS_EQUAL = Counter("requests", "equal")
REQUESTS_DIFFERENT = Counter("requests", "different")
REQUESTS_RECOMPUTABLE_NOT_LOGGED = Counter("requests", "recomputable_not_logged")
ROWS_LOGGED = Counter("rows", "logged")
ROWS_SPEC_MISMATCH = Counter("rows", "spec_mismatch")
ROWS_COMPARED = Counter("rows", "compared")
ROWS_LOGGED_NOT_RECOMPUTABLE = Counter("rows", "logged_not_recomputable")
HISTORY_REFUSED = Counter("history", "refused")
DIFFERENCES_EXPLAINED = Counter("differences", "explained")
DIFFERENCES_UNEXPLAINED = Counter("differences", "unexplained")
# Its completeness check (beam_app/monitoring/completeness.py): the history's requests against the predictions.
HISTORY_REQUESTS = Counter("completeness", "requests")
REQUESTS_ANSWERED = Counter("completeness", "answered")
REQUESTS_ANSWERED_MORE_THAN_ONCE = Counter("completeness", "answered_more_than_once")
REQUESTS_WITHOUT_PREDICTION = Counter("completeness", "without_prediction")
REQUESTS_WITHOUT_PREDICTION_OVERDUE = Counter("completeness", "without_prediction_overdue")
PREDICTIONS_WITHOUT_REQUEST = Counter("completeness", "predictions_without_request")

COMPARED, EQUAL, DIFFERENT = "compared", "equal", "different"
LOGGED_NOT_RECOMPUTABLE, RECOMPUTABLE_NOT_LOGGED = "logged_not_recomputable", "recomputable_not_logged"
COLUMN_VERDICTS = (COMPARED, EQUAL, DIFFERENT, LOGGED_NOT_RECOMPUTABLE, RECOMPUTABLE_NOT_LOGGED)


def column_verdict(column: str, verdict: str) -> Counter:
    """Served rows of one column with one verdict (COLUMN_VERDICTS): column/<column>/<verdict>."""
    return Counter("column", f"{column}/{verdict}")


def explained_by(category: str) -> Counter:
    """Differences explained by one category (transforms/skew.py): differences/explained/<category>."""
    return Counter("differences", f"explained/{category}")


def family(counts: Mapping[str, int], counter_of: Callable[[str], Counter]) -> dict[str, int]:
    """Every counter of one factory among `counts` (duplicates, accepted, explained_by, ...),
    by the name given to the factory."""
    prefix = counter_of("").key
    return {key[len(prefix):]: value for key, value in counts.items() if key.startswith(prefix)}


def explained_by_category(counts: Mapping[str, int]) -> dict[str, int]:
    """Every explained_by counter among `counts`, by category."""
    return family(counts, explained_by)

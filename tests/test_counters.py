"""Every counter is named once, in transforms/counters.py: no other module
makes a Beam counter from its own strings, and no summary, test or bench
reads one by a "namespace/name" literal. Renaming a counter there renames
it everywhere, so a summary cannot check a counter nothing increments."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from transforms import counters

ROOT = Path(__file__).resolve().parents[1]
COUNTERS_PY = ROOT / "transforms" / "counters.py"
SOURCES = sorted(path for folder in ("beam_app", "transforms", "models", "bench", "templates", "tests")
                 for path in (ROOT / folder).rglob("*.py")
                 if path not in (COUNTERS_PY, Path(__file__).resolve()))

CONSTANTS = {name: value for name, value in vars(counters).items() if isinstance(value, counters.Counter)}
FACTORIES = (counters.parsed, counters.duplicates, counters.conflicts, counters.accepted, counters.split_examples,
             counters.dead_letters, counters.bootstrap, counters.explained_by,
             lambda name: counters.column_verdict(name, counters.EQUAL))
NAMESPACES = sorted({c.namespace for c in CONSTANTS.values()} | {f("x").namespace for f in FACTORIES})
# A counter key: a namespace, a slash, a name of identifier characters (column/<name>/<verdict> has two).
KEY = re.compile(rf"^({'|'.join(map(re.escape, NAMESPACES))})/[A-Za-z0-9_]*(/[A-Za-z0-9_]*)?$")


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _beam_counter_calls(tree: ast.AST) -> list[int]:
    """Lines calling Metrics.counter(...) (or beam.metrics.Metrics.counter)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "counter"
            and ast.unparse(node.func.value).split(".")[-1] == "Metrics"]


def _key_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals that spell a counter key, and f-strings that begin with one's namespace."""
    found, parts = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts.update(id(part) for part in node.values)
            head = node.values[0] if node.values else None
            if isinstance(head, ast.Constant) and isinstance(head.value, str) and KEY.match(head.value):
                found.append((node.lineno, ast.unparse(node)))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts
                and KEY.match(node.value)):
            found.append((node.lineno, node.value))
    return sorted(found)


def _trees():
    for path in SOURCES:
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_sources_are_found():
    names = {_relative(path) for path in SOURCES}
    assert {"beam_app/batch.py", "beam_app/consistency.py", "transforms/parse.py", "models/model_updates.py",
            "bench/fnapi_streaming_bench.py", "tests/test_batch_options.py"} <= names


def test_beam_counters_are_made_in_counters_py_only():
    """A DoFn increments `counters.X.metric()`; Metrics.counter(...) appears in transforms/counters.py alone."""
    found = [f"{_relative(path)}:{line}" for path, tree in _trees() for line in _beam_counter_calls(tree)]
    assert found == [], f"make these counters from transforms/counters.py: {found}"


def test_no_counter_is_read_or_written_by_a_literal_key():
    """Summaries, tests and benches use the constants (`counters.X.key`, `counters.X.of(counts)`)."""
    found = [f"{_relative(path)}:{line}: {text}" for path, tree in _trees() for line, text in _key_literals(tree)]
    assert found == [], f"use transforms/counters.py's constants for: {found}"


@pytest.mark.parametrize("text,is_key", [
    ("parse/records_read", True), ("column/origin_departures_1h/equal", True), ("requests/logged", True),
    ("dead_letters/*.ndjson", False), ("events/s on one vCPU", False), ("history/*.ndjson", False),
    ('f"split/examples_{name}"', True), ('f"{prefix}parse/x"', False),
])
def test_the_literal_check_tells_a_key_from_a_path(text, is_key):
    source = text if text.startswith("f\"") else repr(text)
    assert bool(_key_literals(ast.parse(source))) is is_key


def test_each_constant_names_its_own_counter():
    keys = [counter.key for counter in CONSTANTS.values()]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    assert duplicated == []
    assert counters.parsed("request") == counters.REQUESTS
    assert counters.RECORDS_READ.of({"parse/records_read": 3}) == 3 and counters.RECORDS_OK.of({}) == 0


def test_a_tally_counts_what_its_job_counts_and_nothing_of_another_job():
    import uuid

    one, other = uuid.uuid4().hex, uuid.uuid4().hex
    read = counters.RECORDS_READ.metric(one)
    live = counters.LIVE_KEYS.metric(one)
    for _ in range(50):
        read.inc()
    live.inc(3)
    live.dec()
    counters.RECORDS_READ.metric(other).inc(7)
    assert counters.tallied(one) == {counters.RECORDS_READ.key: 50, counters.LIVE_KEYS.key: 2}
    assert counters.tallied(other) == {counters.RECORDS_READ.key: 7}
    counters.forget(other)
    assert counters.tallied(other) == {}


def test_the_streaming_summary_shows_requests_read_and_not_answered():
    from beam_app.streaming import read_and_answered

    tally = {counters.RECORDS_READ.key: 20, counters.accepted("request").key: 9,
             counters.accepted("observation").key: 8, counters.duplicates("request").key: 1,
             counters.duplicates("observation").key: 1, counters.LIVE_KEYS.key: 4, counters.STATE_CLEARED.key: 2}
    written = {"predictions": 6, "dead_letters": {"inference": 1, "parse": 1}}
    summary = read_and_answered(tally, written)
    assert summary["read"] == {"messages": 20, "accepted": {"request": 9, "observation": 8}, "identical_copies": 2}
    assert summary["requests_unanswered"] == 9 - 6 - 1  # read, neither predicted nor a failed inference
    assert summary["feature_state"] == {"live_keys": 4, "cleared": 2, "rebuilt_from_log": 0}

"""Train/eval/test assignment."""

import dataclasses

from transforms.events import rfc3339_to_time_us
from transforms.split import assign_split


def test_time_split_boundaries_are_inclusive_starts(flights_spec):
    split = flights_spec.split
    at = rfc3339_to_time_us
    assert assign_split(split, at("2013-10-31T23:59:59.999999Z"), "x") == "train"
    assert assign_split(split, at("2013-11-01T00:00:00Z"), "x") == "eval"
    assert assign_split(split, at("2013-11-30T23:59:59.999999Z"), "x") == "eval"
    assert assign_split(split, at("2013-12-01T00:00:00Z"), "x") == "test"


def test_hash_split_is_stable_and_follows_the_fractions(flights_spec):
    split = dataclasses.replace(flights_spec.split, method="hash", eval_fraction=0.2, test_fraction=0.1)
    ids = [f"20130101-UA{i}-EWR" for i in range(50_000)]
    first = [assign_split(split, 0, event_id) for event_id in ids]
    assert first == [assign_split(split, 10**15, event_id) for event_id in ids]  # time plays no part
    shares = {name: first.count(name) / len(ids) for name in ("train", "eval", "test")}
    assert abs(shares["eval"] - 0.2) < 0.01 and abs(shares["test"] - 0.1) < 0.01


def test_hash_split_is_the_same_in_another_process_with_another_hash_seed(flights_spec):
    """Stable across runs and machines: another interpreter, whose str hashes differ
    (PYTHONHASHSEED), assigns every id as this one does."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    split = dataclasses.replace(flights_spec.split, method="hash", eval_fraction=0.2, test_fraction=0.1)
    ids = [f"20130101-UA{i}-EWR" for i in range(2_000)]
    here = [assign_split(split, 0, event_id) for event_id in ids]
    code = ("import dataclasses, json, sys; from transforms.split import assign_split; "
            "from transforms.spec import load_spec; "
            "split = dataclasses.replace(load_spec('flights').split, method='hash', eval_fraction=0.2, "
            "test_fraction=0.1); print(json.dumps([assign_split(split, 0, i) for i in json.load(sys.stdin)]))")
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # not this process's seed
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONHASHSEED": seed},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == here
    assert set(here) == {"train", "eval", "test"}

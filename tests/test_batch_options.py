"""The batch entry point's pure parts: split overrides, worker defaults, the count checks."""

import pytest
from apache_beam.options.pipeline_options import DirectOptions

from beam_app.batch import BatchOptions, split_from_options, summarize, use_all_cores_locally
from transforms.spec import SpecError


def test_split_overrides(flights_spec):
    split = split_from_options(flights_spec, BatchOptions(["--eval_start", "2013-10-01"]))
    assert split.eval_start.isoformat() == "2013-10-01T00:00:00+00:00"
    assert split.test_start == flights_spec.split.test_start
    assert split_from_options(flights_spec, BatchOptions(["--split", "hash"])).method == "hash"
    with pytest.raises(SpecError, match="eval_start must not be after test_start"):
        split_from_options(flights_spec, BatchOptions(["--eval_start", "2014-01-01"]))


@pytest.mark.parametrize("argv,workers,mode", [
    (["--runner", "DirectRunner"], 4, "multi_processing"),
    (["--runner", "DirectRunner", "--direct_num_workers", "1"], 1, "in_memory"),  # an explicit default wins
    (["--runner", "DirectRunner", "--direct_num_workers=3", "--direct_running_mode=multi_threading"],
     3, "multi_threading"),
    (["--runner", "DataflowRunner"], 1, "in_memory"),
])
def test_local_worker_default_respects_flags(monkeypatch, argv, workers, mode):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    options = BatchOptions(argv)
    use_all_cores_locally(options, argv)
    direct = options.view_as(DirectOptions)
    assert (direct.direct_num_workers, direct.direct_running_mode) == (workers, mode)


def _counters(**changes):
    counters = {"parse/records_read": 10, "parse/records_ok": 9, "parse/dead_letters": 1,
                "parse/requests": 9, "parse/observations": 8, "windowed_features/feature_rows": 9,
                "examples/unlabeled_requests": 1, "split/examples_train": 6, "split/examples_eval": 1,
                "split/examples_test": 1, "examples/encoded": 8}
    counters.update(changes)
    return counters


def test_counts_that_add_up_pass():
    summary = summarize(_counters())
    assert all(summary["checks"].values())
    assert summary["examples"] == {"train": 6, "eval": 1, "test": 1}


def test_copies_of_an_event_are_accounted_for():
    """Two copies of a request (one identical, one conflicting) and one of an observation: one row per request."""
    summary = summarize(_counters(**{"parse/requests": 11, "parse/observations": 9, "duplicates/request": 1,
                                     "conflicts/request": 1, "duplicates/observation": 1}))
    assert all(summary["checks"].values())
    assert summary["duplicates"] == {"request": 1, "observation": 1} and summary["conflicts"]["request"] == 1
    assert summary["dead_letters"] == 2  # one parse dead letter, one conflict


@pytest.mark.parametrize("changes,failed", [
    ({"parse/dead_letters": 0}, "records_read == records parsed + dead_letters"),
    ({"windowed_features/feature_rows": 8}, "feature_rows == requests - duplicates - conflicts"),
    # A request dropped as a duplicate that was not one: the rows no longer add up.
    ({"duplicates/request": 1}, "feature_rows == requests - duplicates - conflicts"),
    ({"split/examples_train": 5, "examples/encoded": 7}, "feature_rows == examples + unlabeled_requests"),
    ({"examples/encoded": 7}, "examples encoded == examples split"),
])
def test_a_lost_element_fails_a_check(changes, failed):
    checks = summarize(_counters(**changes))["checks"]
    assert not checks[failed]

"""`python -m beam_app.local.loop` (what `make loop` runs), end to end on the real
emulators with small sizes: serve -> archive -> retrain -> reload.

The loop's claims are checked against its evidence files with values
computed here, not by the loop's code: the served predictions against the
events the publisher recorded (one per request; stretch A by v1, stretch B by
v2 after LATEST advanced, without a restart), the archive against the
records, v2's training examples against the labeled requests of stretch A,
each version's MAE from the recorded labels, and the parity of served and
batch predictions against a reference of our own (the batch job on the
recorded events, its examples scored by each version's SavedModel)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _ndjson(*paths: Path) -> list[dict]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_the_loop_serves_archives_retrains_and_reloads(trained_model, tmp_path):
    """v1 is the session's small model (--v1_model: the loop's own v1 training is the batch job and
    models.train, which their own tests cover); everything after it is the loop's."""
    pytest.importorskip("tensorflow")
    from tests.test_streaming_e2e import _batch_references

    _, v1_dir = trained_model
    out = tmp_path / "loop"
    done = subprocess.run([sys.executable, "-m", "beam_app.local.loop", "--output", str(out),
                           "--v1_model", str(v1_dir), "--events", "120", "--after_swap_events", "60", "--rate", "20"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    print(done.stdout[-4000:])
    summary = json.loads((out / "loop.json").read_text())
    assert done.returncode == 0, (summary["failed_steps"], done.stderr[-3000:])
    assert summary["passed"] and not summary["failed_steps"]

    published_a = _ndjson(out / "published_stretch_a.ndjson")
    published_b = _ndjson(*sorted(out.glob("published_stretch_b*.ndjson"), key=lambda p: int(p.stem.rsplit("b", 1)[1])))
    assert len(published_a) == 120 and len(published_b) == 60
    labels = {e["event_id"]: e.get("dep_delay") for e in published_a + published_b if e["role"] == "request"}
    requests_a = {e["event_id"] for e in published_a if e["role"] == "request"}
    requests_b = {e["event_id"] for e in published_b if e["role"] == "request"}

    # One prediction per published request; A by v1, B by v2 (LATEST at the end), the job never restarted.
    served = _ndjson(out / "served_predictions.ndjson")
    assert sorted(row["event_id"] for row in served) == sorted(requests_a | requests_b)
    v1, v2 = summary["v1"]["version"], summary["v2"]["version"]
    assert v1 == v1_dir.name and (out / "model" / v1 / "saved_model").is_dir()  # a copy: the fixture's stays
    assert (v1_dir.parent / "LATEST").read_text().strip() == v1_dir.name
    assert v1 != v2 and (out / "model" / "LATEST").read_text().strip() == v2
    version_of = {row["event_id"]: row["model_version"] for row in served}
    assert {version_of[i] for i in requests_a} == {v1}
    assert v2 in {version_of[i] for i in requests_b}
    assert {version_of[i] for i in requests_b} <= {v1, v2}
    log = (out / "streaming_job.log").read_text()
    assert log.count("streaming job started") == 1
    assert f"model version {v2} serves from now on (was {v1})" in log

    # The archive holds what was published, labels included; v2 trained on it: one example per labeled request of A.
    archive = _ndjson(out / "archive.ndjson")
    assert sorted((e["event_id"], e["role"]) for e in archive) == \
        sorted((e["event_id"], e["role"]) for e in published_a + published_b)
    assert {e["event_id"]: e.get("dep_delay") for e in archive if e["role"] == "request"} == labels
    v2_data = json.loads((out / "data_v2" / "summary.json").read_text())
    assert v2_data["records_read"] == len(published_a)
    assert sum(v2_data["examples"].values()) == sum(labels[i] is not None for i in requests_a)
    v2_metrics = json.loads((out / "model" / v2 / "metrics.json").read_text())
    assert v2_metrics["warm_start_from"]["version"] == v1
    assert sum(v2_metrics["examples"].values()) == sum(v2_data["examples"].values())

    # Rows and MAE per version, from the recorded labels.
    for entry in summary["versions"]:
        rows = [row for row in served if row["model_version"] == entry["version"]]
        errors = [abs(row["prediction"] - labels[row["event_id"]]) for row in rows
                  if labels[row["event_id"]] is not None]
        assert (entry["rows"], entry["labeled_rows"]) == (len(rows), len(errors))
        assert entry["mae"] == pytest.approx(sum(errors) / len(errors), rel=1e-9)
    by_version = {entry["version"]: entry for entry in summary["versions"]}
    assert summary["mae"] == {"before_swap": by_version[v1]["mae"], "after_swap": by_version[v2]["mae"]}

    # Parity, the loop's (beam_app.predict on the BigQuery archive) and ours (the batch job on the records).
    assert summary["parity"]["passed"] and summary["parity"]["compared"] == len(served)
    history = tmp_path / "history.ndjson"
    history.write_text("".join(json.dumps(e) + "\n" for e in published_a + published_b))
    # Where the stream answered before an earlier observation arrived, its features lacked it (allowed).
    when = lambda text: dt.datetime.fromisoformat(text)  # noqa: E731
    late = {row["event_id"] for row in served if any(
        e["role"] != "request" and when(e["event_time"]) < when(row["event_time"])
        and when(e["processing_time"]) > when(row["processing_time"]) for e in archive)}
    assert summary["parity"]["differ_unexplained"] == 0
    references = _batch_references("flights", history, tmp_path / "batch", [out / "model" / v1, out / "model" / v2])
    for version in (v1, v2):
        reference = references[version]
        mine = {row["event_id"]: row["prediction"] for row in served if row["model_version"] == version}
        checked = set(mine) & set(reference)
        assert checked == {i for i in mine if labels[i] is not None}  # the batch job keeps labeled requests
        differ = {i: (mine[i], reference[i]) for i in checked - late
                  if mine[i] != pytest.approx(reference[i], rel=1e-5, abs=1e-5)}
        assert not differ, f"{version}: {list(differ.items())[:3]}"


def test_parity_takes_each_served_row_against_the_batch_prediction_of_its_own_version():
    from beam_app.local.loop import parity

    at = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    served = [{"event_id": "a", "model_version": "v1", "prediction": 10.0, "processing_time": at},
              {"event_id": "b", "model_version": "v2", "prediction": 5.0, "processing_time": at}]
    # a: |diff| 1e-6 <= 1e-5 x 10; b: 2e-5 <= 1e-5 x 5.00002. The other version's numbers do not matter.
    batch = {"v1": {"a": 10.000001, "b": 70.0}, "v2": {"a": 30.0, "b": 5.00002}}
    result = parity(served, batch, {"a", "b"})
    assert result["passed"] and result["compared"] == 2 and result["differ_count"] == 0
    assert result["max_abs_diff"] == pytest.approx(2e-5)
    assert result["per_version"]["v1"]["compared"] == result["per_version"]["v2"]["compared"] == 1

    batch["v2"]["b"] = 5.001  # 1e-3 > 1e-5 x 5.001
    assert parity(served, batch, {"a", "b"})["differ_count"] == 1
    del batch["v2"]["a"]  # v2 did not score every archived request: not passed, though no served row differs
    batch["v2"]["b"] = 5.0
    assert not parity(served, batch, {"a", "b"})["passed"]
    assert parity(served, {"v1": batch["v1"]}, {"a", "b"})["missing_count"] == 1


def test_versions_served_in_the_order_they_began_with_the_mae_of_their_labeled_rows():
    from beam_app.local.loop import versions_served

    at = [dt.datetime(2026, 12, 1, 0, 0, s, tzinfo=dt.timezone.utc) for s in range(3)]
    served = [{"event_id": "c", "model_version": "v2", "prediction": 7.0, "processing_time": at[2]},
              {"event_id": "a", "model_version": "v1", "prediction": 10.0, "processing_time": at[0]},
              {"event_id": "b", "model_version": "v1", "prediction": 4.0, "processing_time": at[1]}]
    labels = {"a": 12.0, "b": None, "c": 1.0}  # b: a cancelled flight, no label
    v1_entry, v2_entry = versions_served(served, labels, {"v1": {"a": 10.0, "b": 4.0, "c": 2.0}})
    assert (v1_entry["version"], v1_entry["rows"], v1_entry["labeled_rows"], v1_entry["mae"]) == ("v1", 2, 1, 2.0)
    assert (v1_entry["began_serving"], v1_entry["last_served"]) == (at[0], at[1])
    assert (v2_entry["version"], v2_entry["rows"], v2_entry["mae"]) == ("v2", 1, 6.0)
    assert v2_entry["mae_of_other_versions_on_these_rows"] == {"v1": 1.0}  # |2 - 1|
    assert "mae_of_other_versions_on_these_rows" not in v1_entry


def test_a_difference_is_explained_only_where_an_earlier_observation_arrived_after_the_answer():
    from beam_app.local.loop import answered_before_an_earlier_observation, parity

    t = [dt.datetime(2026, 12, 1, 0, 0, s, tzinfo=dt.timezone.utc) for s in range(10)]
    archive = [{"event_id": "o1", "role": "observation", "event_time": t[1], "processing_time": t[2]},
               {"event_id": "o2", "role": "observation", "event_time": t[3], "processing_time": t[8]},  # late
               {"event_id": "r", "role": "request", "event_time": t[2], "processing_time": t[2]}]
    served = [{"event_id": "before", "event_time": t[2], "processing_time": t[4], "model_version": "v1",
               "prediction": 1.0},  # o2 is later in event time: not in its window
              {"event_id": "missed", "event_time": t[5], "processing_time": t[6], "model_version": "v1",
               "prediction": 1.0},  # o2 (t3 < t5) arrived at t8, after the answer at t6
              {"event_id": "saw_it", "event_time": t[5], "processing_time": t[9], "model_version": "v1",
               "prediction": 1.0}]  # answered after o2 arrived
    late = answered_before_an_earlier_observation(served, archive)
    assert late == {"missed"}
    batch = {"v1": {"before": 1.0, "missed": 2.0, "saw_it": 1.0}}
    result = parity(served, batch, {"before", "missed", "saw_it"}, frozenset(late))
    assert result["passed"] and (result["differ_count"], result["differ_explained_by_late_observation"]) == (1, 1)
    batch["v1"]["saw_it"] = 2.0
    result = parity(served, batch, {"before", "missed", "saw_it"}, frozenset(late))
    assert not result["passed"] and result["differ_unexplained"] == 1


def test_v1_model_is_copied_from_a_version_or_the_latest_of_a_model_directory(tmp_path):
    from beam_app.local.loop import LoopError, copy_version

    source = tmp_path / "models"
    for version in ("v1", "v2"):
        (source / version / "saved_model").mkdir(parents=True)
        (source / version / "metrics.json").write_text(f'{{"version": "{version}"}}')
    (source / "LATEST").write_text("v1\n")  # not the newest directory: LATEST decides
    assert copy_version(source, tmp_path / "a" / "model") == "v1"
    assert (tmp_path / "a" / "model" / "LATEST").read_text() == "v1\n"
    assert json.loads((tmp_path / "a" / "model" / "v1" / "metrics.json").read_text()) == {"version": "v1"}
    assert copy_version(source / "v2", tmp_path / "b" / "model") == "v2"
    assert sorted(p.name for p in (tmp_path / "b" / "model").iterdir()) == ["LATEST", "v2"]
    assert (source / "LATEST").read_text() == "v1\n"  # the source is left as it was
    with pytest.raises(LoopError, match="not a version directory"):
        copy_version(tmp_path / "a", tmp_path / "c" / "model")

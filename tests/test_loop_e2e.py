"""`python -m beam_app.loop` (what `make loop` runs), end to end on the real
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

import json
import subprocess
import sys
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")

from tests.test_streaming_e2e import _batch_reference  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _ndjson(*paths: Path) -> list[dict]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_the_loop_serves_archives_retrains_and_reloads(tmp_path):
    out = tmp_path / "loop"
    done = subprocess.run([sys.executable, "-m", "beam_app.loop", "--output", str(out), "--train_days", "3",
                           "--events", "120", "--after_swap_events", "60", "--rate", "20"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    print(done.stdout[-4000:])
    summary = json.loads((out / "loop.json").read_text())
    assert done.returncode == 0, (summary["failed_steps"], done.stderr[-3000:])
    assert summary["passed"] and not summary["failed_steps"] and not summary["missing_pieces"]

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
    for version in (v1, v2):
        reference = _batch_reference("flights", history, tmp_path / f"batch-{version}", out / "model" / version)
        mine = {row["event_id"]: row["prediction"] for row in served if row["model_version"] == version}
        checked = set(mine) & set(reference)
        assert checked == {i for i in mine if labels[i] is not None}  # the batch job keeps labeled requests
        differ = {i: (mine[i], reference[i]) for i in checked
                  if mine[i] != pytest.approx(reference[i], rel=1e-5, abs=1e-5)}
        assert not differ, f"{version}: {list(differ.items())[:3]}"

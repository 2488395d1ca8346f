"""The feature spec: the shipped flights spec and the errors a bad spec gets."""

import copy

import pytest

from transforms.spec import SpecError, load_spec, parse_duration_s, spec_from_dict


def test_flights_spec_is_the_contract(flights_spec):
    assert [(f.name, f.key, f.aggregate, f.field, f.window_s) for f in flights_spec.windowed_features] == [
        ("origin_departures_1h", "origin", "count", None, 3600),
        ("origin_dep_delay_mean_1h", "origin", "mean", "dep_delay", 3600),
        ("origin_dep_delay_max_1h", "origin", "max", "dep_delay", 3600),
        ("origin_dep_delay_mean_3h", "origin", "mean", "dep_delay", 10800),
        ("carrier_dep_delay_mean_3h", "carrier", "mean", "dep_delay", 10800),
    ]
    assert flights_spec.static_features == (
        "carrier", "origin", "dest", "distance", "hour", "minute", "month", "day_of_week")
    assert flights_spec.label.name == "dep_delay"
    assert flights_spec.entity_keys == ("origin", "carrier")
    assert flights_spec.split.eval_start.isoformat() == "2013-11-01T00:00:00+00:00"
    assert flights_spec.split.test_start.isoformat() == "2013-12-01T00:00:00+00:00"


def test_document_round_trip_and_fingerprint(flights_spec, tmp_path):
    document = flights_spec.to_document()
    assert spec_from_dict(document) == flights_spec
    reordered = dict(reversed(list(document.items())))
    assert spec_from_dict(reordered).fingerprint == flights_spec.fingerprint
    changed = copy.deepcopy(document)
    changed["windowed_features"][0]["window"] = "2h"
    assert spec_from_dict(changed).fingerprint != flights_spec.fingerprint


def test_edited_spec_json_is_refused(flights_spec, tmp_path):
    import json

    path = tmp_path / "spec.json"
    body = {"spec": flights_spec.to_document(), "fingerprint": flights_spec.fingerprint}
    path.write_text(json.dumps(body))
    assert load_spec(path) == flights_spec
    body["spec"]["windowed_features"][0]["window"] = "2h"
    path.write_text(json.dumps(body))
    with pytest.raises(SpecError, match="fingerprint"):
        load_spec(path)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["0h", "-1h", "1w", "h", "", None, True])
def test_bad_durations(text):
    with pytest.raises(SpecError, match="duration"):
        parse_duration_s(text)


def _broken(flights_spec, edit):
    document = copy.deepcopy(flights_spec.to_document())
    edit(document)
    return document


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["windowed_features"][1].update(aggregate="median"), "aggregate: one of"),
    (lambda d: d["windowed_features"][1].update(key="dest"), "not one of entity_keys"),
    (lambda d: d["windowed_features"][1].update(field="carrier"), "not a numeric observation field"),
    (lambda d: d["windowed_features"][1].pop("field"), "needs the observation field"),
    (lambda d: d["windowed_features"][1].update(window="soon"), "positive duration"),
    (lambda d: d["windowed_features"][1].update(name="origin_departures_1h"), "used twice"),
    (lambda d: d["request"]["fields"]["distance"].update(type="double"), "type: one of"),
    (lambda d: d["request"]["fields"]["distance"].update(vocabulary=["a"]), "for string fields only"),
    (lambda d: d["observation"]["fields"].pop("carrier"), "must be a field of observation events"),
    (lambda d: d.update(windowed_feature=[]), "unknown keys"),
    (lambda d: d["split"].update(eval_start="2014-01-01"), "eval_start must not be after test_start"),
    (lambda d: d["split"].update(test_fraction=0.95), "must leave some training data"),
    (lambda d: d["request"].pop("label"), "request.label"),
    (lambda d: d["source"].update(csv_adapter="taxi"), "source.csv_adapter: expected 'package.module:function'"),
    (lambda d: d["windowed_features"][0].update(name="Bad-Name"), r"windowed_features\[0\].name: use lower_snake_case"),
    (lambda d: d["windowed_features"][1].update(aggregate="ratio"), r"per: a ratio needs the field it divides by"),
    (lambda d: d["windowed_features"][1].update(per="dep_delay"), "only a ratio has one"),
    (lambda d: d["windowed_features"][1].update(aggregate="ratio", per="carrier"),
     "per: 'carrier' is not a numeric observation field"),
    (lambda d: d.update(evaluation={"rate_baseline": "carrier"}), "rate_baseline: 'carrier' is not a numeric request"),
    (lambda d: d.update(evaluation={"rate": "distance"}), r"spec.evaluation: unknown keys \['rate'\]"),
    (lambda d: (d["request"]["fields"]["distance"].update(required=False),
                d["request"]["fields"].update(distance_present={"type": "int"})), r"used twice.*distance_present"),
    (lambda d: d["request"]["fields"].update({"Dest2": {"type": "string"}}), "use lower_snake_case"),
])
def test_bad_specs_say_what_is_wrong(flights_spec, edit, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(_broken(flights_spec, edit))


def test_unknown_spec_name_lists_the_shipped_ones():
    with pytest.raises(SpecError, match="flights"):
        load_spec("no_such_spec")

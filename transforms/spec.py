"""The feature spec: the one source of truth for what an event holds and which
features are computed from it.

A spec is a YAML (or JSON) file, validated on load. Everything downstream reads
the `FeatureSpec` built here: the parser (field types and constraints), the
windowed-feature engine (keys, aggregates, windows), the example encoder (the
tf.Example layout) and the `spec.json` written beside the training data.

    spec = load_spec("flights")          # a shipped spec, or a path to a file
    spec.windowed_features[0].window_s   # 3600
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from transforms.adapters import is_reference

SPECS_DIR = Path(__file__).parent / "specs"

FIELD_TYPES = ("string", "int", "float")
AGGREGATES = ("count", "sum", "mean", "min", "max", "ratio")
ROLES = ("request", "observation")
SPLIT_METHODS = ("time", "hash")
SPLITS = ("train", "eval", "test")

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_DURATION_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


PRESENCE_SUFFIX = "_present"


def presence_name(name: str) -> str:
    """The 0/1 flag encoded beside a value that may be missing (an optional
    number, an aggregate other than count): `<name>_present`."""
    return name + PRESENCE_SUFFIX


class SpecError(ValueError):
    """A spec file is malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """A typed field of an event, with the checks that make a value valid."""

    name: str
    type: str
    required: bool = True
    vocabulary: Optional[tuple[str, ...]] = None  # closed set: other values are rejected
    min: Optional[float] = None
    max: Optional[float] = None

    @property
    def has_presence(self) -> bool:
        """An optional number is encoded with a `<name>_present` flag: its 0
        when missing must not read as a real 0 (strings have no such clash)."""
        return not self.required and self.type != "string"


@dataclasses.dataclass(frozen=True)
class WindowedFeature:
    """AGG(field) over the observations of the same key in [t - window_s, t);
    ratio: sum(field) / sum(per) over those where both are present."""

    name: str
    key: str
    aggregate: str
    window_s: int
    field: Optional[str] = None  # None only for count: counts observations
    per: Optional[str] = None  # the denominator of a ratio

    @property
    def has_presence(self) -> bool:
        """Counts are 0 on an empty window; every other aggregate is missing."""
        return self.aggregate != "count"

    @property
    def inputs(self) -> tuple[str, ...]:
        """The observation fields one value of this aggregate reads: () for a count."""
        return tuple(f for f in (self.field, self.per) if f is not None)


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    method: str = "time"
    eval_start: Optional[dt.datetime] = None  # time split: [eval_start, test_start) is eval
    test_start: Optional[dt.datetime] = None
    eval_fraction: float = 0.1  # hash split
    test_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    name: str
    description: str
    csv_adapter: Optional[str]
    default_input: Optional[str]
    event_id_pattern: Optional[str]
    request_fields: tuple[FieldSpec, ...]
    observation_fields: tuple[FieldSpec, ...]
    label: FieldSpec
    entity_keys: tuple[str, ...]
    windowed_features: tuple[WindowedFeature, ...]
    split: SplitSpec
    static_features: tuple[str, ...]  # request fields fed to the model (keys included)
    rate_baseline: Optional[str] = None  # evaluation: also report label = rate x this request field

    def presence_flags(self, with_windowed: bool = True) -> tuple[str, ...]:
        """The presence flags of the encoded example: optional numeric request
        fields', then (with_windowed) the windowed features'."""
        flags = tuple(presence_name(f.name) for f in self.request_fields if f.has_presence)
        if with_windowed:
            flags += tuple(presence_name(f.name) for f in self.windowed_features if f.has_presence)
        return flags

    def fields(self, role: str) -> tuple[FieldSpec, ...]:
        return self.request_fields if role == "request" else self.observation_fields

    @property
    def max_window_s(self) -> int:
        return max(f.window_s for f in self.windowed_features)

    def to_document(self) -> dict[str, Any]:
        """The normalized spec in the file format: `spec_from_dict` reads it back
        to an equal spec. This is what spec.json carries."""

        def field(f: FieldSpec, with_name: bool = False) -> dict[str, Any]:
            body = {"name": f.name} if with_name else {}
            body["type"] = f.type
            if not f.required and f is not self.label:
                body["required"] = False
            for key in ("vocabulary", "min", "max"):
                if getattr(f, key) is not None:
                    value = getattr(f, key)
                    body[key] = list(value) if key == "vocabulary" else value
            return body

        def iso(value: Optional[dt.datetime]) -> Optional[str]:
            return None if value is None else value.isoformat().replace("+00:00", "Z")

        document: dict[str, Any] = {"name": self.name, "description": self.description}
        source = {k: v for k, v in (("csv_adapter", self.csv_adapter), ("default_input", self.default_input)) if v}
        if source:
            document["source"] = source
        if self.event_id_pattern:
            document["event_id"] = {"pattern": self.event_id_pattern}
        document["request"] = {"fields": {f.name: field(f) for f in self.request_fields},
                               "label": field(self.label, with_name=True)}
        document["observation"] = {"fields": {f.name: field(f) for f in self.observation_fields}}
        document["entity_keys"] = list(self.entity_keys)
        document["windowed_features"] = [
            {k: v for k, v in (("name", w.name), ("key", w.key), ("aggregate", w.aggregate),
                               ("field", w.field), ("per", w.per), ("window", f"{w.window_s}s")) if v is not None}
            for w in self.windowed_features]
        split = {"method": self.split.method, "eval_start": iso(self.split.eval_start),
                 "test_start": iso(self.split.test_start), "eval_fraction": self.split.eval_fraction,
                 "test_fraction": self.split.test_fraction}
        document["split"] = {k: v for k, v in split.items() if v is not None}
        if self.rate_baseline:
            document["evaluation"] = {"rate_baseline": self.rate_baseline}
        return document

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical normalized spec: equal specs, equal prints,
        however the YAML was formatted."""
        canonical = json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_duration_s(text: Any, where: str = "duration") -> int:
    """'90s', '30m', '1h', '7d' (or a plain number of seconds) -> seconds."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = _DURATION.match(str(text))
    if not match or int(match.group(1)) <= 0:
        raise SpecError(f"{where}: expected a positive duration like 90s, 30m, 1h or 7d, got {text!r}")
    return int(match.group(1)) * _DURATION_UNIT_S[match.group(2)]


def parse_utc_date(text: Any, where: str) -> dt.datetime:
    """An ISO date or datetime, read as UTC when it carries no offset."""
    try:
        value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise SpecError(f"{where}: expected an ISO date like 2013-11-01, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def shipped_specs() -> list[str]:
    """The names of the specs shipped in transforms/specs/."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> FeatureSpec:
    """A shipped spec by name ('flights') or a spec file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SPECS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise SpecError(f"no spec {str(name_or_path)!r}: give a file path or one of: {', '.join(shipped_specs())}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML/JSON: {err}") from None
    if isinstance(raw, dict) and "spec" in raw and "fingerprint" in raw:  # a spec.json written by a job
        expected, raw = raw["fingerprint"], raw["spec"]
    else:
        expected = None
    try:
        spec = spec_from_dict(raw)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
    if expected is not None and spec.fingerprint != expected:
        raise SpecError(f"{path}: the spec does not match its recorded fingerprint {expected[:12]}: was it edited?")
    return spec


def spec_from_dict(raw: Any) -> FeatureSpec:
    """Validates a parsed spec document and builds the `FeatureSpec`."""
    doc = _Doc(raw, "spec")
    name = doc.name()
    source = doc.sub("source", optional=True)
    request = doc.sub("request")
    observation = doc.sub("observation")
    request_fields = _fields(request.sub("fields"), "request.fields")
    observation_fields = _fields(observation.sub("fields"), "observation.fields")
    label = _field(request.get("label"), "request.label")
    if label.type != "float" and label.type != "int":
        raise SpecError(f"request.label: must be numeric (int or float), got {label.type!r}")
    label = dataclasses.replace(label, required=False)  # live requests have no label yet
    if label.name in {f.name for f in request_fields}:
        raise SpecError(f"request.label: {label.name!r} is also a request field; a label is not a feature")

    entity_keys = tuple(doc.list("entity_keys"))
    req_by_name = {f.name: f for f in request_fields}
    obs_by_name = {f.name: f for f in observation_fields}
    for key in entity_keys:
        for role, by_name in (("request", req_by_name), ("observation", obs_by_name)):
            if key not in by_name:
                raise SpecError(f"entity_keys: {key!r} must be a field of {role} events")
            if by_name[key].type != "string" or not by_name[key].required:
                raise SpecError(f"entity_keys: {key!r} must be a required string field of {role} events")

    windowed = tuple(
        _windowed(item, f"windowed_features[{i}]", entity_keys, obs_by_name)
        for i, item in enumerate(doc.list("windowed_features"))
    )
    if not windowed:
        raise SpecError("windowed_features: at least one is needed")
    names = [f.name for f in request_fields] + [label.name, "event_id"]
    names += [presence_name(f.name) for f in request_fields if f.has_presence]
    for wf in windowed:
        names += [wf.name] + ([presence_name(wf.name)] if wf.has_presence else [])
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SpecError(f"names used twice in the encoded example: {duplicated}")

    doc.reject_unknown({"name", "description", "source", "event_id", "request", "observation",
                        "entity_keys", "windowed_features", "split", "evaluation"})
    request.reject_unknown({"fields", "label"})
    observation.reject_unknown({"fields"})
    id_doc = doc.sub("event_id", optional=True)
    pattern = id_doc.get("pattern") if id_doc.raw else None
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise SpecError(f"event_id.pattern: not a regular expression: {err}") from None
    csv_adapter = source.get("csv_adapter") if source.raw else None
    if csv_adapter is not None and not (isinstance(csv_adapter, str) and is_reference(csv_adapter)):
        raise SpecError(f"source.csv_adapter: expected 'package.module:function' (the function that turns a CSV "
                        f"row into events), got {csv_adapter!r}")
    evaluation = doc.sub("evaluation", optional=True)
    evaluation.reject_unknown({"rate_baseline"})
    rate_baseline = evaluation.get("rate_baseline")
    if rate_baseline is not None and (rate_baseline not in req_by_name or req_by_name[rate_baseline].type == "string"):
        numeric = sorted(n for n, f in req_by_name.items() if f.type != "string")
        raise SpecError(f"evaluation.rate_baseline: {rate_baseline!r} is not a numeric request field; have {numeric}")
    return FeatureSpec(
        name=name,
        description=str(doc.get("description") or ""),
        csv_adapter=csv_adapter,
        default_input=source.get("default_input") if source.raw else None,
        event_id_pattern=pattern,
        request_fields=request_fields,
        observation_fields=observation_fields,
        label=label,
        entity_keys=entity_keys,
        windowed_features=windowed,
        split=_split(doc.sub("split", optional=True)),
        static_features=tuple(f.name for f in request_fields),
        rate_baseline=rate_baseline,
    )


class _Doc:
    """A mapping in the spec document, with errors that say where."""

    def __init__(self, raw: Any, where: str, optional: bool = False):
        if raw is None and optional:
            raw = {}
        if not isinstance(raw, Mapping):
            raise SpecError(f"{where}: expected a mapping, got {type(raw).__name__}")
        self.raw, self.where = raw, where

    def get(self, key: str) -> Any:
        return self.raw.get(key)

    def str(self, key: str) -> str:
        value = self.raw.get(key)
        if not isinstance(value, str) or not value:
            raise SpecError(f"{self.where}.{key}: a non-empty string is required")
        return value

    def name(self, key: str = "name") -> str:
        """A name that becomes a feature or file name: lower_snake_case."""
        value = self.str(key)
        if not _NAME.match(value):
            raise SpecError(f"{self.where}.{key}: use lower_snake_case, got {value!r}")
        return value

    def list(self, key: str) -> Sequence[Any]:
        value = self.raw.get(key)
        if not isinstance(value, list):
            raise SpecError(f"{self.where}.{key}: a list is required")
        return value

    def sub(self, key: str, optional: bool = False) -> "_Doc":
        if key not in self.raw and not optional:
            raise SpecError(f"{self.where}.{key}: missing")
        return _Doc(self.raw.get(key), f"{self.where}.{key}", optional)

    def reject_unknown(self, allowed: set[str]) -> None:
        unknown = sorted(set(self.raw) - allowed)
        if unknown:
            raise SpecError(f"{self.where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def _fields(doc: _Doc, where: str) -> tuple[FieldSpec, ...]:
    if not doc.raw:
        raise SpecError(f"{where}: at least one field is needed")
    return tuple(_field({"name": name, **(body or {})}, f"{where}.{name}") for name, body in doc.raw.items())


def _field(raw: Any, where: str) -> FieldSpec:
    doc = _Doc(raw, where)
    doc.reject_unknown({"name", "type", "required", "vocabulary", "min", "max"})
    name = doc.name()
    ftype = doc.get("type")
    if ftype not in FIELD_TYPES:
        raise SpecError(f"{where}.type: one of {list(FIELD_TYPES)} is required, got {ftype!r}")
    vocabulary = doc.get("vocabulary")
    if vocabulary is not None:
        if ftype != "string" or not isinstance(vocabulary, list) or not vocabulary:
            raise SpecError(f"{where}.vocabulary: a non-empty list, for string fields only")
        vocabulary = tuple(str(v) for v in vocabulary)
    bounds = {}
    for bound in ("min", "max"):
        value = doc.get(bound)
        if value is not None:
            if ftype == "string" or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"{where}.{bound}: a number, for numeric fields only")
            bounds[bound] = float(value)
    required = doc.raw.get("required", True)
    if not isinstance(required, bool):
        raise SpecError(f"{where}.required: true or false")
    return FieldSpec(name=name, type=ftype, required=required, vocabulary=vocabulary, **bounds)


def _windowed(raw: Any, where: str, keys: Sequence[str], obs_fields: Mapping[str, FieldSpec]) -> WindowedFeature:
    doc = _Doc(raw, where)
    doc.reject_unknown({"name", "key", "aggregate", "field", "per", "window"})
    name = doc.name()
    key = doc.str("key")
    if key not in keys:
        raise SpecError(f"{where}.key: {key!r} is not one of entity_keys {list(keys)}")
    aggregate = doc.str("aggregate")
    if aggregate not in AGGREGATES:
        raise SpecError(f"{where}.aggregate: one of {list(AGGREGATES)}, got {aggregate!r}")
    field = doc.get("field")
    if field is None and aggregate != "count":
        raise SpecError(f"{where}.field: {aggregate} needs the observation field it aggregates")
    per = doc.get("per")
    if (per is None) != (aggregate != "ratio"):
        raise SpecError(f"{where}.per: a ratio needs the field it divides by (per), and only a ratio has one")
    for role, value in (("field", field), ("per", per)):
        if value is not None and (value not in obs_fields or obs_fields[value].type == "string"):
            numeric = sorted(n for n, f in obs_fields.items() if f.type != "string")
            raise SpecError(f"{where}.{role}: {value!r} is not a numeric observation field; have {numeric}")
    return WindowedFeature(name=name, key=key, aggregate=aggregate, field=field, per=per,
                           window_s=parse_duration_s(doc.get("window"), f"{where}.window"))


def _split(doc: _Doc) -> SplitSpec:
    doc.reject_unknown({"method", "eval_start", "test_start", "eval_fraction", "test_fraction"})
    method = doc.get("method") or "time"
    if method not in SPLIT_METHODS:
        raise SpecError(f"split.method: one of {list(SPLIT_METHODS)}, got {method!r}")
    eval_start = doc.get("eval_start")
    test_start = doc.get("test_start")
    split = SplitSpec(
        method=method,
        eval_start=parse_utc_date(eval_start, "split.eval_start") if eval_start is not None else None,
        test_start=parse_utc_date(test_start, "split.test_start") if test_start is not None else None,
        eval_fraction=float(doc.get("eval_fraction") if doc.get("eval_fraction") is not None else 0.1),
        test_fraction=float(doc.get("test_fraction") if doc.get("test_fraction") is not None else 0.1),
    )
    validate_split(split)
    return split


def validate_split(split: SplitSpec) -> None:
    """Raises SpecError when a split cannot be applied (also used for CLI overrides)."""
    if split.method == "time":
        if split.eval_start is None or split.test_start is None:
            raise SpecError("split: a time split needs eval_start and test_start")
        if split.eval_start > split.test_start:
            raise SpecError("split: eval_start must not be after test_start")
    for name, value in (("eval_fraction", split.eval_fraction), ("test_fraction", split.test_fraction)):
        if not 0.0 <= value < 1.0:
            raise SpecError(f"split.{name}: must be in [0, 1), got {value}")
    if split.eval_fraction + split.test_fraction >= 1.0:
        raise SpecError("split: eval_fraction + test_fraction must leave some training data")

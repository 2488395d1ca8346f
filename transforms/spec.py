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
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import yaml

from transforms.adapters import is_reference

SPECS_DIR = Path(__file__).parent / "specs"

FIELD_TYPES = ("string", "int", "float")
# What each aggregate reads and how it is encoded is in `AGGREGATE_RULES`.
AGGREGATES = ("count", "sum", "mean", "min", "max", "ratio", "stddev", "last", "time_since_last", "last_k",
              "count_distinct")
REQUEST = "request"
DEFAULT_KIND = "observation"  # the kind of a spec with one kind of observation
SPLIT_METHODS = ("time", "hash")
SPLITS = ("train", "eval", "test")

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_DURATION_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_LAST_K = 64
# A kind's name is its role and its parse counter (transforms/counters.py parsed): not these.
RESERVED_KIND_NAMES = frozenset({REQUEST, "requests", "observations", "records_read", "records_ok", "dead_letters"})


PRESENCE_SUFFIX = "_present"
LENGTH_SUFFIX = "_length"


def presence_name(name: str) -> str:
    """The 0/1 flag encoded beside a value that may be missing (an optional
    number, an aggregate other than count): `<name>_present`."""
    return name + PRESENCE_SUFFIX


def length_name(name: str) -> str:
    """How many of a `last_k` feature's k values are real: `<name>_length`."""
    return name + LENGTH_SUFFIX


class SpecError(ValueError):
    """A spec file is malformed; the message names the file and the field."""


class AggregateRule(NamedTuple):
    """What the spec checks of an aggregate and how its value is encoded."""

    field: str  # "none" (reads no field), "numeric", "any" (a field of any type), "optional" (none or numeric)
    per: bool = False  # needs a denominator field (ratio)
    k: bool = False  # needs k (last_k)
    integer: bool = False  # int64, 0 on an empty window (counts)
    sequence: bool = False  # k float32 values, newest first, 0-padded, and `<name>_length`


AGGREGATE_RULES = {
    "count": AggregateRule("none", integer=True),
    "sum": AggregateRule("numeric"),
    "mean": AggregateRule("numeric"),
    "min": AggregateRule("numeric"),
    "max": AggregateRule("numeric"),
    "ratio": AggregateRule("numeric", per=True),
    "stddev": AggregateRule("numeric"),
    "last": AggregateRule("numeric"),
    "time_since_last": AggregateRule("optional"),
    "last_k": AggregateRule("numeric", k=True, sequence=True),
    "count_distinct": AggregateRule("any", integer=True),
}
assert set(AGGREGATE_RULES) == set(AGGREGATES)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """A typed field of an event, with the checks that make a value valid."""

    name: str
    type: str
    required: bool = True
    vocabulary: Optional[tuple[str, ...]] = None  # closed set: other values are rejected
    min: Optional[float] = None
    max: Optional[float] = None
    model_input: bool = True  # request fields: False for one that only keys features (a tail number)

    @property
    def has_presence(self) -> bool:
        """An optional number is encoded with a `<name>_present` flag: its 0
        when missing must not read as a real 0 (strings have no such clash)."""
        return not self.required and self.type != "string"


@dataclasses.dataclass(frozen=True)
class ObservationKind:
    """One kind of observation (flights: a departure, the weather at an
    airport), with its own fields and event ids."""

    name: str
    fields: tuple[FieldSpec, ...]
    event_id_pattern: Optional[str] = None  # None: the spec's pattern

    def field(self, name: str) -> Optional[FieldSpec]:
        return next((f for f in self.fields if f.name == name), None)


@dataclasses.dataclass(frozen=True)
class Source:
    """A named CSV source and the adapter that turns one of its rows into events."""

    name: str
    csv_adapter: Optional[str] = None  # 'package.module:function'
    default_input: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class WindowedFeature:
    """AGG(field) over the observations of `kind` with the same key value in
    [t - window_s, t); ratio: sum(field) / sum(per) over those where both
    are present. The key is one field or several (a composite key)."""

    name: str
    key: tuple[str, ...]
    aggregate: str
    window_s: int
    field: Optional[str] = None  # None for count (counts observations) and time_since_last (of any observation)
    per: Optional[str] = None  # the denominator of a ratio
    kind: str = DEFAULT_KIND
    k: Optional[int] = None  # last_k
    key_optional: bool = False  # a request may lack the key: then this feature is missing

    @property
    def rule(self) -> AggregateRule:
        return AGGREGATE_RULES[self.aggregate]

    @property
    def has_presence(self) -> bool:
        """Counts are 0 and sequences empty on an empty window, so they need
        a flag only when the key itself may be missing; every other
        aggregate is missing on an empty window."""
        return not (self.rule.integer or self.rule.sequence) or self.key_optional

    @property
    def inputs(self) -> tuple[str, ...]:
        """The observation fields one value of this aggregate reads: () for a count."""
        return tuple(f for f in (self.field, self.per) if f is not None)

    @property
    def group(self) -> tuple[str, tuple[str, ...]]:
        """The features of one kind and key are computed together."""
        return self.kind, self.key


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
    sources: tuple[Source, ...]
    event_id_pattern: Optional[str]
    request_fields: tuple[FieldSpec, ...]
    kinds: tuple[ObservationKind, ...]
    label: FieldSpec
    windowed_features: tuple[WindowedFeature, ...]
    split: SplitSpec
    rate_baseline: Optional[str] = None  # evaluation: also report label = rate x this request field

    @property
    def static_features(self) -> tuple[str, ...]:
        """The request fields the model reads (a key-only field is not one)."""
        return tuple(f.name for f in self.request_fields if f.model_input)

    @property
    def roles(self) -> tuple[str, ...]:
        """What an event's role may be: a request, or one of the observation kinds."""
        return (REQUEST, *(kind.name for kind in self.kinds))

    def kind(self, name: str) -> ObservationKind:
        for kind in self.kinds:
            if kind.name == name:
                return kind
        raise KeyError(name)

    def presence_flags(self, with_windowed: bool = True) -> tuple[str, ...]:
        """The presence flags of the encoded example: optional numeric request
        fields', then (with_windowed) the windowed features'."""
        flags = tuple(presence_name(f.name) for f in self.request_fields if f.has_presence)
        if with_windowed:
            flags += tuple(presence_name(f.name) for f in self.windowed_features if f.has_presence)
        return flags

    def fields(self, role: str) -> tuple[FieldSpec, ...]:
        return self.request_fields if role == REQUEST else self.kind(role).fields

    @property
    def max_window_s(self) -> int:
        """The longest window: how far back any request reads (warm starts, de-duplication horizons)."""
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
            if not f.model_input:
                body["model_input"] = False
            return body

        def iso(value: Optional[dt.datetime]) -> Optional[str]:
            return None if value is None else value.isoformat().replace("+00:00", "Z")

        def kind(k: ObservationKind) -> dict[str, Any]:
            body: dict[str, Any] = {"fields": {f.name: field(f) for f in k.fields}}
            if k.event_id_pattern:
                body["event_id"] = {"pattern": k.event_id_pattern}
            return body

        document: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.sources:
            document["sources"] = {s.name: {k: v for k, v in (("csv_adapter", s.csv_adapter),
                                                              ("default_input", s.default_input)) if v}
                                   for s in self.sources}
        if self.event_id_pattern:
            document["event_id"] = {"pattern": self.event_id_pattern}
        document["request"] = {"fields": {f.name: field(f) for f in self.request_fields},
                               "label": field(self.label, with_name=True)}
        document["observations"] = {k.name: kind(k) for k in self.kinds}
        document["windowed_features"] = [
            {k: v for k, v in (("name", w.name), ("kind", w.kind),
                               ("key", w.key[0] if len(w.key) == 1 else list(w.key)),
                               ("aggregate", w.aggregate), ("field", w.field), ("per", w.per), ("k", w.k),
                               ("window", f"{w.window_s}s")) if v is not None}
            for w in self.windowed_features]
        split = {"method": self.split.method, "eval_start": iso(self.split.eval_start),
                 "test_start": iso(self.split.test_start), "eval_fraction": self.split.eval_fraction,
                 "test_fraction": self.split.test_fraction}
        document["split"] = {k: v for k, v in split.items() if v is not None}
        if self.rate_baseline:
            document["evaluation"] = {"rate_baseline": self.rate_baseline}
        return document

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical normalized spec (every kind, source and
        feature): equal specs, equal prints, however the YAML was formatted.
        Worked out once per spec object (the jobs stamp it on every row; the
        spec is frozen, and a cached_property writes past the frozen setattr)."""
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
        value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise SpecError(f"{where}: expected an ISO date like 2013-11-01, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def shipped_specs() -> list[str]:
    """The names of the specs shipped in transforms/specs/."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> FeatureSpec:
    """A shipped spec by name ('flights') or a spec file by path."""
    path = _spec_path(name_or_path)
    raw = _read_document(path)
    if isinstance(raw, dict) and "spec" in raw and "fingerprint" in raw:  # a spec.json written by a job
        expected, raw = raw["fingerprint"], raw["spec"]
    else:
        expected = None
    try:
        spec = spec_from_dict(_extended(raw, path, ()))
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
    if expected is not None and spec.fingerprint != expected:
        raise SpecError(f"{path}: the spec does not match its recorded fingerprint {expected[:12]}: was it edited?")
    return spec


def _spec_path(name_or_path: str | Path, relative_to: Optional[Path] = None) -> Path:
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute() and path.suffix:
        path = relative_to / path
    if not path.suffix and not path.exists():
        path = SPECS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise SpecError(f"no spec {str(name_or_path)!r}: give a file path or one of: {', '.join(shipped_specs())}")
    return path


def _read_document(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML/JSON: {err}") from None


def _extended(raw: Any, path: Path, seen: tuple[Path, ...]) -> Any:
    """A document with `extends: <spec>` resolved: the base spec's document,
    with the keys this one gives replacing the base's, except
    `windowed_features` (appended), and `observations` and `sources` (merged
    by name). What results is an ordinary spec: spec.json holds it whole."""
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    base_path = _spec_path(raw["extends"], path.parent)
    if base_path.resolve() in seen:
        raise SpecError(f"extends: {raw['extends']!r} extends itself")
    try:
        base = spec_from_dict(_extended(_read_document(base_path), base_path, (*seen, base_path.resolve())))
    except SpecError as err:
        raise SpecError(f"extends {raw['extends']!r}: {err}") from None
    document = base.to_document()
    for key, value in raw.items():
        if key == "extends":
            continue
        if key == "windowed_features" and isinstance(value, list):
            document[key] = document[key] + value
        elif key in ("observations", "sources") and isinstance(value, dict):
            document[key] = {**document.get(key, {}), **value}
        else:
            document[key] = value
    return document


def spec_from_dict(raw: Any) -> FeatureSpec:
    """Validates a parsed spec document and builds the `FeatureSpec`."""
    doc = _Doc(raw, "spec")
    name = doc.name()
    doc.reject_unknown({"name", "description", "source", "sources", "event_id", "request", "observation",
                        "observations", "windowed_features", "split", "evaluation"})
    request = doc.sub("request")
    request.reject_unknown({"fields", "label"})
    request_fields = _fields(request.sub("fields"), "request.fields", allow_model_input=True)
    label = _field(request.get("label"), "request.label")
    if label.type != "float" and label.type != "int":
        raise SpecError(f"request.label: must be numeric (int or float), got {label.type!r}")
    label = dataclasses.replace(label, required=False)  # live requests have no label yet
    if label.name in {f.name for f in request_fields}:
        raise SpecError(f"request.label: {label.name!r} is also a request field; a label is not a feature")

    kinds = _kinds(doc)
    req_by_name = {f.name: f for f in request_fields}
    windowed = tuple(
        _windowed(item, f"windowed_features[{i}]", req_by_name, kinds)
        for i, item in enumerate(doc.list("windowed_features"))
    )
    if not windowed:
        raise SpecError("windowed_features: at least one is needed")
    names = [f.name for f in request_fields] + [label.name, "event_id"]
    names += [presence_name(f.name) for f in request_fields if f.has_presence]
    for wf in windowed:
        names += [wf.name] + ([presence_name(wf.name)] if wf.has_presence else [])
        names += [length_name(wf.name)] if wf.rule.sequence else []
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SpecError(f"names used twice in the encoded example: {duplicated}")

    evaluation = doc.sub("evaluation", optional=True)
    evaluation.reject_unknown({"rate_baseline"})
    rate_baseline = evaluation.get("rate_baseline")
    if rate_baseline is not None and (rate_baseline not in req_by_name or req_by_name[rate_baseline].type == "string"):
        numeric = sorted(n for n, f in req_by_name.items() if f.type != "string")
        raise SpecError(f"evaluation.rate_baseline: {rate_baseline!r} is not a numeric request field; have {numeric}")
    return FeatureSpec(
        name=name,
        description=str(doc.get("description") or ""),
        sources=_sources(doc, name),
        event_id_pattern=_pattern(doc, "event_id"),
        request_fields=request_fields,
        kinds=kinds,
        label=label,
        windowed_features=windowed,
        split=_split(doc.sub("split", optional=True)),
        rate_baseline=rate_baseline,
    )


def _pattern(doc: "_Doc", key: str) -> Optional[str]:
    id_doc = doc.sub(key, optional=True)
    id_doc.reject_unknown({"pattern"})
    pattern = id_doc.get("pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise SpecError(f"{id_doc.where}.pattern: not a regular expression: {err}") from None
    return pattern


def _sources(doc: "_Doc", spec_name: str) -> tuple[Source, ...]:
    """`sources: {name: {csv_adapter, default_input}}`, or the one-source
    shorthand `source: {...}` (a source named after the spec)."""
    if "source" in doc.raw and "sources" in doc.raw:
        raise SpecError("give either source (one) or sources (named), not both")
    if "source" in doc.raw:
        bodies = {spec_name: doc.get("source")}
        where = {spec_name: "source"}
    else:
        sources_doc = doc.sub("sources", optional=True)
        bodies = dict(sources_doc.raw)
        where = {name: f"sources.{name}" for name in bodies}
    sources = []
    for name, body in bodies.items():
        source = _Doc(body, where[name])
        source.reject_unknown({"csv_adapter", "default_input"})
        if not _NAME.match(str(name)):
            raise SpecError(f"{where[name]}: use lower_snake_case for a source name, got {name!r}")
        csv_adapter = source.get("csv_adapter")
        if csv_adapter is not None and not (isinstance(csv_adapter, str) and is_reference(csv_adapter)):
            raise SpecError(f"{where[name]}.csv_adapter: expected 'package.module:function' (the function that "
                            f"turns a CSV row into events), got {csv_adapter!r}")
        sources.append(Source(str(name), csv_adapter, source.get("default_input")))
    return tuple(sources)


def _kinds(doc: "_Doc") -> tuple[ObservationKind, ...]:
    """`observations: {kind: {fields, event_id}}`, or the one-kind shorthand
    `observation: {fields}` (the kind named `observation`)."""
    if ("observation" in doc.raw) == ("observations" in doc.raw):
        raise SpecError("give either observation (one kind) or observations (named kinds)")
    if "observation" in doc.raw:
        bodies, where = {DEFAULT_KIND: doc.get("observation")}, {DEFAULT_KIND: "observation"}
    else:
        bodies = dict(doc.sub("observations").raw)
        where = {name: f"observations.{name}" for name in bodies}
        if not bodies:
            raise SpecError("observations: at least one kind is needed")
    kinds = []
    for name, body in bodies.items():
        kind = _Doc(body, where[name])
        kind.reject_unknown({"fields", "event_id"})
        if not _NAME.match(str(name)) or name in RESERVED_KIND_NAMES:
            raise SpecError(f"{where[name]}: a kind is named in lower_snake_case and is none of "
                            f"{sorted(RESERVED_KIND_NAMES)} (names the counters use), got {name!r}")
        kinds.append(ObservationKind(str(name), _fields(kind.sub("fields"), f"{where[name]}.fields"),
                                     _pattern(kind, "event_id")))
    return tuple(kinds)
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


def _fields(doc: _Doc, where: str, allow_model_input: bool = False) -> tuple[FieldSpec, ...]:
    if not doc.raw:
        raise SpecError(f"{where}: at least one field is needed")
    return tuple(_field({"name": name, **(body or {})}, f"{where}.{name}", allow_model_input)
                 for name, body in doc.raw.items())


def _field(raw: Any, where: str, allow_model_input: bool = False) -> FieldSpec:
    doc = _Doc(raw, where)
    doc.reject_unknown({"name", "type", "required", "vocabulary", "min", "max"}
                       | ({"model_input"} if allow_model_input else set()))
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
    model_input = doc.raw.get("model_input", True)
    for flag, value in (("required", required), ("model_input", model_input)):
        if not isinstance(value, bool):
            raise SpecError(f"{where}.{flag}: true or false")
    return FieldSpec(name=name, type=ftype, required=required, vocabulary=vocabulary, model_input=model_input,
                     **bounds)


def _windowed(raw: Any, where: str, request_fields: Mapping[str, FieldSpec],
              kinds: Sequence[ObservationKind]) -> WindowedFeature:
    doc = _Doc(raw, where)
    doc.reject_unknown({"name", "kind", "key", "aggregate", "field", "per", "k", "window"})
    name = doc.name()
    kind_names = [k.name for k in kinds]
    kind_name = doc.get("kind")
    if kind_name is None:
        if len(kinds) > 1:
            raise SpecError(f"{where}.kind: this spec has several kinds of observation {kind_names}: name the "
                            f"one this feature reads")
        kind_name = kinds[0].name
    if kind_name not in kind_names:
        raise SpecError(f"{where}.kind: {kind_name!r} is not a kind of observation of this spec; have {kind_names}")
    kind = next(k for k in kinds if k.name == kind_name)
    key = _key(doc.get("key"), f"{where}.key", request_fields, kind)
    aggregate = doc.str("aggregate")
    if aggregate not in AGGREGATES:
        raise SpecError(f"{where}.aggregate: one of {list(AGGREGATES)}, got {aggregate!r}")
    rule = AGGREGATE_RULES[aggregate]
    field, per, k = doc.get("field"), doc.get("per"), doc.get("k")
    if rule.field == "none" and field is not None:
        raise SpecError(f"{where}.field: {aggregate} counts observations and reads no field")
    if rule.field in ("numeric", "any") and field is None:
        raise SpecError(f"{where}.field: {aggregate} needs the observation field it aggregates")
    if per is not None and not rule.per or per is None and rule.per:
        raise SpecError(f"{where}.per: a ratio needs the field it divides by (per), and only a ratio has one")
    if rule.k != (k is not None):
        raise SpecError(f"{where}.k: last_k needs k (how many values it keeps), and only last_k has one")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_LAST_K):
        raise SpecError(f"{where}.k: an integer from 1 to {MAX_LAST_K}, got {k!r}")
    for role, value in (("field", field), ("per", per)):
        if value is None:
            continue
        spec_field = kind.field(value)
        if spec_field is None or (rule.field != "any" and spec_field.type == "string"):
            wanted = "" if rule.field == "any" else "numeric "
            have = sorted(f.name for f in kind.fields if rule.field == "any" or f.type != "string")
            raise SpecError(f"{where}.{role}: {value!r} is not a {wanted}field of {kind.name} observations; "
                            f"have {have}")
    return WindowedFeature(name=name, key=key, aggregate=aggregate, field=field, per=per, kind=kind.name, k=k,
                           window_s=parse_duration_s(doc.get("window"), f"{where}.window"),
                           key_optional=any(not request_fields[part].required for part in key))


def _key(raw: Any, where: str, request_fields: Mapping[str, FieldSpec], kind: ObservationKind) -> tuple[str, ...]:
    """One field or a list of them (a composite key), each a string field of
    requests and of the kind. Either side may be optional: a request without
    it gets the feature missing, an observation without it is left out."""
    parts = [raw] if isinstance(raw, str) else raw
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p for p in parts):
        raise SpecError(f"{where}: a field name, or a list of them for a composite key, got {raw!r}")
    if len(set(parts)) != len(parts):
        raise SpecError(f"{where}: {parts} names a field twice")
    for part in parts:
        for side, field in (("request", request_fields.get(part)), (f"{kind.name} observation", kind.field(part))):
            if field is None:
                raise SpecError(f"{where}: {part!r} must be a field of {side} events")
            if field.type != "string":
                raise SpecError(f"{where}: {part!r} must be a string field of {side} events, it is {field.type}")
    return tuple(parts)


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

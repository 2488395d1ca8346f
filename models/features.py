"""What the model reads, derived from the feature spec (as written to spec.json):
the one place that decides how each feature enters the model.

- numeric: float request fields and wide-range ints, normalized; an optional
  one with its presence flag (0 where missing must not read as a real 0);
- categorical: string request fields, through a vocabulary lookup and an embedding;
- ordinal: int request fields with a small declared range (hour, month, day of
  week), looked up and embedded, not normalized: under a time split their later
  values (November, December) never occur in training, and a linear effect
  learned on 1..10 would extrapolate (test MAE 18.97 as numbers, 18.62 as embeddings);
- circular: an ordinal field whose eval split holds values the training split
  never has (the month under the time split: November) enters as a point on a
  circle (cos, sin: December lies between November and January) instead of an
  embedding, and is left out of the crosses: those values would meet embedding
  rows and cross buckets training never fitted (or, hashed, fitted for other
  pairs). An hour training never saw (0 to 4 am) that eval does not hold
  either keeps the embedding;
- windowed: the windowed features, normalized, with their presence flags;
  counts and time_since_last log-scaled first (log1p): they span orders of
  magnitude (seconds since an aircraft's last departure: 0 to 86,400);
- sequences (last_k): a small recurrent branch (a GRU over the k values,
  masked by `<name>_length`);
- crosses (the wide part): every key field that is a model input crossed
  with every ordinal field but the circular ones, hashed, e.g. origin x hour.

A request field marked `model_input: false` (a tail number: a key with
thousands of values) is in the examples but not a model input.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np

from transforms.spec import FeatureSpec, length_name, load_spec

MAX_ORDINAL_VALUES = 64  # an int field with at most this many declared values is also categorical


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    ordinal: dict[str, tuple[int, int]]  # name -> (min, max) declared in the spec
    windowed: tuple[str, ...]
    presence: tuple[str, ...]  # flags of optional numeric request fields and of windowed features
    crosses: tuple[tuple[str, str], ...]
    label: str
    log_scaled: tuple[str, ...] = ()  # windowed features log1p-scaled before normalizing
    sequences: tuple[tuple[str, str, int], ...] = ()  # (name, its length column, k)
    circular: tuple[str, ...] = ()  # ordinal fields on a circle instead of an embedding, not crossed

    @property
    def names(self) -> tuple[str, ...]:
        """Every example feature the model takes as input."""
        ordered = (*self.categorical, *self.ordinal, *self.numeric, *self.windowed,
                   *(part for name, length, _ in self.sequences for part in (name, length)), *self.presence)
        return tuple(dict.fromkeys(ordered))


def model_inputs(spec: FeatureSpec, use_windowed: bool = True, circular: Collection[str] = ()) -> ModelInputs:
    """How each feature of the spec enters the model; without the windowed
    features for the baseline that shows what they are worth. `circular`:
    the ordinal fields to put on a circle (`unseen_later`'s answer)."""
    numeric, categorical, ordinal = [], [], {}
    for field in spec.request_fields:
        if not field.model_input:
            continue
        if field.type == "string":
            categorical.append(field.name)
            continue
        if (field.type == "int" and field.min is not None and field.max is not None
                and field.max - field.min + 1 <= MAX_ORDINAL_VALUES):
            ordinal[field.name] = (int(field.min), int(field.max))
        else:
            numeric.append(field.name)
    features = spec.windowed_features if use_windowed else ()
    windowed = tuple(f.name for f in features if not f.rule.sequence)
    sequences = tuple((f.name, length_name(f.name), f.k) for f in features if f.rule.sequence)
    log_scaled = tuple(f.name for f in features if f.rule.integer or f.aggregate == "time_since_last")
    presence = spec.presence_flags(with_windowed=use_windowed)
    inputs = set(spec.static_features)
    keys = dict.fromkeys(f.key[0] for f in spec.windowed_features if len(f.key) == 1 and f.key[0] in inputs)
    circular = tuple(name for name in ordinal if name in circular)
    crosses = tuple((key, name) for key in keys for name in ordinal if name not in circular)
    return ModelInputs(tuple(numeric), tuple(categorical), ordinal, windowed, presence, crosses, spec.label.name,
                       log_scaled, sequences, circular)


def unseen_later(names: Sequence[str], train: Mapping[str, Sequence[int]],
                 later: Mapping[str, Sequence[int]]) -> tuple[str, ...]:
    """The fields among `names` whose later values (the eval split's) include
    one that the training split's values never are."""
    def values(column) -> set[int]:
        return set(np.unique(np.asarray(column)).tolist())

    return tuple(name for name in names if values(later[name]) - values(train[name]))


def training_spec(data_dir: str | Path) -> FeatureSpec:
    """The spec the examples in data_dir were written with (its spec.json)."""
    return load_spec(Path(data_dir) / "spec.json")

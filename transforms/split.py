"""Train/eval/test assignment of examples, and the Beam step that routes them.

A time split cuts on the request time (UTC): nothing of the future leaks into
training. A hash split is stable per event_id across runs and machines.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import apache_beam as beam

from transforms import counters
from transforms.spec import SPLITS, SplitSpec
from transforms.feature_layout import FeatureRow

_US = 1_000_000


def assign_split(split: SplitSpec, time_us: int, event_id: str) -> str:
    """'train', 'eval' or 'test' for one request."""
    if split.method == "time":
        if time_us >= int(split.test_start.timestamp()) * _US:
            return "test"
        if time_us >= int(split.eval_start.timestamp()) * _US:
            return "eval"
        return "train"
    digest = hashlib.md5(event_id.encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if position < split.test_fraction:
        return "test"
    if position < split.test_fraction + split.eval_fraction:
        return "eval"
    return "train"


class _SplitDoFn(beam.DoFn):
    def __init__(self, split: SplitSpec):
        self._split = split
        self._counters = {name: counters.split_examples(name).metric() for name in SPLITS}

    def process(self, row: FeatureRow):
        name = assign_split(self._split, row.event.time_us, row.event.event_id)
        self._counters[name].inc()
        yield beam.pvalue.TaggedOutput(name, row)


class SplitExamples(beam.PTransform):
    """PCollection[FeatureRow] -> {"train": ..., "eval": ..., "test": ...}, counted."""

    def __init__(self, split: SplitSpec, label: Optional[str] = None):
        super().__init__(label)
        self._split = split

    def expand(self, rows):
        outputs = rows | "Assign" >> beam.ParDo(_SplitDoFn(self._split)).with_outputs(*SPLITS)
        return {name: outputs[name] for name in SPLITS}

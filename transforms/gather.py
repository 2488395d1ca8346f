"""Few, large elements: the DirectRunner's (and the Python SDK's) cost is
per element, so bounded steps pass lists of records, events or rows
(`Batch`), and a step that would send one element per event to a shuffle
sends one list per key per bundle instead (`GatherInBundle`)."""

from __future__ import annotations

import pickle

import apache_beam as beam
from apache_beam.coders import coder_impl
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue


class Batch(list):
    """A list of records, events or rows passed as one element, with a coder
    of its own (`BatchCoder`)."""


class BatchCoder(beam.coders.Coder):
    """Pickles a Batch, if it ever crosses a stage, and estimates its size
    from its length. The runner measures a sample of every step's elements
    (all of the first ten, then about 10 ln 2 of each next N), and Beam's
    default coder measures a list of NamedTuples by pickling it whole: a
    third to a half of every batch, for a metric."""

    def _create_impl(self):
        return coder_impl.CallbackCoderImpl(lambda batch: pickle.dumps(batch, pickle.HIGHEST_PROTOCOL), pickle.loads,
                                            lambda batch: 100 * len(batch))

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return Batch


beam.coders.registry.register_coder(Batch, BatchCoder)


class _InBatches(beam.DoFn):
    def __init__(self, size: int):
        self._size = size

    def start_bundle(self):
        self._batch = Batch()

    def process(self, element):
        self._batch.append(element)
        if len(self._batch) >= self._size:
            yield self._batch
            self._batch = Batch()

    def finish_bundle(self):
        if self._batch:
            yield WindowedValue(self._batch, MIN_TIMESTAMP, [GlobalWindow()])  # bounded input: the global window
        self._batch = Batch()


class InBatches(beam.PTransform):
    """PCollection[X] (bounded, in the global window) -> PCollection[Batch of X],
    up to `size` elements each, a bundle at a time."""

    def __init__(self, size: int = 5000, label=None):
        super().__init__(label)
        self._size = size

    def expand(self, elements):
        return elements | "Batch" >> beam.ParDo(_InBatches(self._size)).with_output_types(Batch)


class GatherInBundle(beam.DoFn):
    """element -> (key, value) pairs (by `pairs`), sent on as (key, [value, ...]):
    one list per key per bundle (or per `cap` values held), not an element per
    value. What a lifted combine does, without the per-element step in front
    of it: the runner's cost is per element, and a scatter makes several per
    event."""

    def __init__(self, pairs, cap: int = 100_000):
        self._pairs, self._cap = pairs, cap

    def start_bundle(self):
        self._lists: dict = {}
        self._held = 0

    def process(self, element):
        lists = self._lists
        for key, value in self._pairs(element):
            lists.setdefault(key, []).append(value)
            self._held += 1
        if self._held >= self._cap:  # memory stays bounded whatever the bundle's size
            yield from self._lists.items()
            self.start_bundle()

    def finish_bundle(self):
        for pair in self._lists.items():
            yield WindowedValue(pair, MIN_TIMESTAMP, [GlobalWindow()])  # bounded input: the global window
        self.start_bundle()

"""Few, large elements between stages: the DirectRunner's (and the Python
SDK's) cost is per element, so a step that would send one element per
event to a shuffle sends one list per key per bundle instead."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue


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

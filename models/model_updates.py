"""New model versions for a running streaming job, without a restart.

`models.train` writes each version under `<model_dir>/<version>/` and then
`<model_dir>/LATEST` (last, so LATEST never names a half-written version).
While a job runs, LATEST is read at most every `poll_s` seconds. A version not
seen before is loaded once and its spec fingerprint checked:

- trained on the job's spec: it serves from the next batch on; every
  prediction row names the version that made it;
- trained on another spec: refused, logged, counted
  (`model_updates/refused`) and a dead letter (stage `model`); the model that
  was serving keeps serving.

Two pieces do this. `ServingModel` (models/inference.py) is what
`SavedModelHandler.load_model` returns when the job watches a model
directory: each inference call asks it for the model to use, and it swaps
when LATEST names a new version that passes the check (the decision is
`ModelCheck.judge`). `WatchLatestModel`, here, is a small branch of the job
that makes the same decision once per version, on one key, so that a refused
version is one dead letter, not one per worker.

Why not Beam's model-update side input (`RunInference(model_metadata_pcoll=...)`,
fed by `WatchFilePattern` or `PeriodicImpulse`): on the streaming DirectRunner a
side input blocks the main input until the side input's watermark passes the
end of the global window, which never happens in a streaming job (measured:
not one prediction in 180 s), and `PeriodicImpulse` next to `ReadFromPubSub`
fails there at start (Beam 2.77: "...ProcessKeyedElements/GroupByKey... was not
replaced as expected"). A swap inside the handler works on every runner, and is
tested here on the emulators.
"""

from __future__ import annotations

from typing import Callable, Optional

import apache_beam as beam
from apache_beam.coders import StrUtf8Coder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from models.inference import ModelCheck, read_latest
from transforms import counters
from transforms.spec import FeatureSpec


class _Tick(beam.DoFn):
    """Any element -> ("LATEST", time) at most once every `poll_s` per DoFn
    instance: the job's input paces the polls, and the one key sees only ticks."""

    def __init__(self, poll_s: float, clock: Callable[[], float]):
        self._poll_s = poll_s
        self._clock = clock  # injectable: tests drive the polls

    def setup(self):
        self._next_s = 0.0

    def process(self, _element):
        now = self._clock()
        if now >= self._next_s:
            self._next_s = now + self._poll_s
            yield "LATEST", now


class _RefusedVersions(beam.DoFn):
    """("LATEST", time) -> DeadLetter of each version LATEST names that may not serve, once."""

    SEEN = ReadModifyWriteStateSpec("seen", StrUtf8Coder())  # the last version judged, accepted or not

    def __init__(self, model_dir: str, spec: FeatureSpec, serving_version: str):
        self._model_dir = model_dir
        self._spec = spec
        self._serving_version = serving_version
        self._accepted = counters.MODEL_UPDATES_ACCEPTED.metric()
        self._refused = counters.MODEL_UPDATES_REFUSED.metric()

    def setup(self):
        self._check = ModelCheck(self._model_dir, self._spec)

    def process(self, _tick, seen=beam.DoFn.StateParam(SEEN)):
        last = seen.read() or self._serving_version
        try:
            version = read_latest(self._model_dir)
        except OSError:  # ServingModel logs it
            return
        loaded, dead = self._check.judge(version, last)
        if version is not None and version != last:
            seen.write(version)
        if dead is not None:
            self._refused.inc()
            yield dead
        elif loaded is not None:
            self._accepted.inc()


class WatchLatestModel(beam.PTransform):
    """PCollection[anything] (the job's input: it paces the polls) ->
    PCollection[DeadLetter] of the versions LATEST named that were refused.
    The swap itself happens in ServingModel."""

    def __init__(self, model_dir: str, spec: FeatureSpec, serving_version: str, poll_s: float,
                 clock: Callable[[], float], label: Optional[str] = None):
        super().__init__(label)
        self._model_dir = model_dir
        self._spec = spec
        self._serving_version = serving_version
        self._poll_s = poll_s
        self._clock = clock

    def expand(self, pacer):
        return (
            pacer
            | "Tick" >> beam.ParDo(_Tick(self._poll_s, self._clock)).with_output_types(tuple[str, float])
            | "RefusedVersions" >> beam.ParDo(_RefusedVersions(self._model_dir, self._spec, self._serving_version))
        )

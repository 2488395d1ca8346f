"""`KeptModelHandler`: the streaming job's SavedModelHandler, its model kept
loaded in the process across the DirectRunner's bundles.

A module of its own, not beam_app/streaming.py: the job runs as
`python -m beam_app.streaming`, whose classes cloudpickle copies by value
with the globals they read, and the cache below holds TensorFlow objects
that cannot be pickled.
"""

from __future__ import annotations

import collections
import threading
import uuid
from typing import Optional

from models.inference import SavedModelHandler, WatchLatest
from transforms.spec import FeatureSpec

# The models KeptModelHandler loaded in this process, by handler (the last few): a per-process
# cache like Beam's own shared-model map (apache_beam.utils.shared), which holds weak references
# only and keeps just the last object acquired alive.
_KEPT_MODELS: "collections.OrderedDict[str, object]" = collections.OrderedDict()
_KEPT_MODELS_LOCK = threading.Lock()
_KEPT_MODELS_MAX = 2


class KeptModelHandler(SavedModelHandler):
    """SavedModelHandler whose loaded model stays loaded in the process.

    The DirectRunner runs each bundle on a fresh copy of a DoFn (pickled and
    unpickled) and calls its setup() every time: RunInference's weak,
    per-process model cache loses the model as soon as the bundle's copy is
    gone, so every bundle loaded and warmed the SavedModel again (measured:
    a third of the job's CPU time). Held here, the next bundle's setup finds
    it. On Dataflow a DoFn lives across bundles and this changes nothing.
    With a model watch, the cached ServingModel keeps the version it swapped
    to, where a reload would start from the version found at start. Keyed
    by the handler (a token made with it, which its pickled copies keep), so
    two jobs in one process (tests) never share a model or a watch's clock."""

    def __init__(self, model_path: str, spec: FeatureSpec, watch: Optional[WatchLatest] = None):
        super().__init__(model_path, spec, watch=watch)
        self._token = uuid.uuid4().hex

    def load_model(self):
        key = f"{self._token}:{self._model_path}"  # a new path (update_model_path) is a new load
        with _KEPT_MODELS_LOCK:
            model = _KEPT_MODELS.get(key)
            if model is None:
                model = _KEPT_MODELS[key] = super().load_model()
                while len(_KEPT_MODELS) > _KEPT_MODELS_MAX:
                    _KEPT_MODELS.popitem(last=False)
            _KEPT_MODELS.move_to_end(key)
        return model

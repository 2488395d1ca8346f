"""A streaming runner for one stateful DoFn, in the bench's own process: what
`bench/hot_key_bench.py` and `bench/churn_bench.py` drive the point-in-time
step with.

State is kept as a cache-off worker keeps it, Dataflow's default: each read
decodes the bytes, each write encodes them, with the coders of the DoFn's own
state specs, and the bytes are counted. Timers fire in time order as the
benches move the watermark. No runner is in the way: the FnApiRunner runs a
bounded replay stage after stage, with a watermark that jumps to the end, so
it can neither time one key's firing nor leave state behind at a chosen
watermark."""

from __future__ import annotations

import inspect


class Bytes:
    read = written = 0


class _Bag:
    """A bag as a cache-off runner keeps it: encoded, decoded at every read."""

    def __init__(self, coder, counted: Bytes):
        self._coder, self._counted, self._encoded = coder, counted, []

    def add(self, value):
        encoded = self._coder.encode(value)
        self._counted.written += len(encoded)
        self._encoded.append(encoded)

    def read(self):
        self._counted.read += sum(map(len, self._encoded))
        return [self._coder.decode(encoded) for encoded in self._encoded]

    def clear(self):
        self._encoded = []


class _Value:
    def __init__(self, coder, counted: Bytes):
        self._coder, self._counted, self._encoded = coder, counted, None

    def read(self):
        if self._encoded is None:
            return None
        self._counted.read += len(self._encoded)
        return self._coder.decode(self._encoded)

    def write(self, value):
        self._encoded = self._coder.encode(value)
        self._counted.written += len(self._encoded)

    def clear(self):
        self._encoded = None


class _Timer:
    def __init__(self):
        self.at = None

    def set(self, timestamp):
        self.at = timestamp.micros

    def clear(self):
        self.at = None


class KeyState:
    """One state key's state and timers, for whichever state specs the DoFn declares."""

    def __init__(self, dofn_class, counted: Bytes):
        from apache_beam.transforms.userstate import BagStateSpec, TimerSpec

        self.cells, self.timers, self._bound, self._parameters = {}, {}, {}, {}
        for spec in vars(dofn_class).values():
            if isinstance(spec, TimerSpec):
                self.timers[spec.name] = _Timer()
            elif isinstance(spec, BagStateSpec):
                self.cells[spec.name] = _Bag(spec.coder, counted)
            elif hasattr(spec, "coder") and hasattr(spec, "name"):
                self.cells[spec.name] = _Value(spec.coder, counted)

    def arguments(self, method, **given) -> dict:
        """A DoFn method's keyword arguments: its StateParam and TimerParam defaults bound to this key's."""
        bound = self._bound.get(method.__name__)
        if bound is None:
            bound = self._bound[method.__name__] = {}
            for name, parameter in inspect.signature(method).parameters.items():
                default = parameter.default
                spec = getattr(default, "state_spec", None) or getattr(default, "timer_spec", None)
                if spec is not None:
                    bound[name] = self.cells.get(spec.name) or self.timers[spec.name]
        parameters = self._parameters.get(method.__name__)
        if parameters is None:
            parameters = self._parameters[method.__name__] = set(inspect.signature(method).parameters)
        return {**bound, **{name: value for name, value in given.items() if name in parameters}}


def fire_due(dofn, state: KeyState, watermark_us: int, **given) -> list:
    """Fires the state key's timers at or before the watermark, earliest first (a timer a
    firing sets that is also due fires in turn) -> what the firings output."""
    from apache_beam.utils.timestamp import Timestamp

    from apache_beam.transforms.userstate import TimerSpec

    callbacks = {spec.name: spec._attached_callback.__name__ for spec in vars(type(dofn)).values()
                 if isinstance(spec, TimerSpec)}
    outputs = []
    while True:
        due = [(timer.at, name) for name, timer in state.timers.items() if timer.at is not None and timer.at <= watermark_us]
        if not due:
            return outputs
        at, name = min(due)
        state.timers[name].at = None
        method = getattr(dofn, callbacks[name])
        outputs.extend(method(**state.arguments(method, fired_at=Timestamp(micros=at), **given)) or [])


def next_timer_us(state: KeyState):
    """When the state key's earliest timer is set for (None: no timer)."""
    return min((timer.at for timer in state.timers.values() if timer.at is not None), default=None)


def holds_state(state: KeyState) -> bool:
    """Whether a state key still holds anything: a value, a bag entry, or a timer set
    before the end of time (a drain timer at the end of the window is not state that grows)."""
    from apache_beam.transforms.window import GlobalWindow

    end = GlobalWindow().max_timestamp().micros
    return (any(getattr(cell, "_encoded", None) for cell in state.cells.values())
            or any(timer.at is not None and timer.at < end for timer in state.timers.values()))

"""Keys that come and go: the point-in-time step's state held at the end of a
churn replay, against the keys ever seen and the keys active within the
horizon.

Each key (a user) is active for a short while: its events come within
`--active_min` minutes of its first one, and new keys start at a steady
rate through the replay. The step's own DoFn (`_PointInTimeDoFn`, a one-group
spec: clicks per user over 1 h, allowed lateness 10 min) is driven with a
timer firing per one-second step (bench/dofn_harness.py: state decoded and
encoded at every access, as a cache-off worker's). At the end it counts the
state keys still holding state; a state key is a key value
(`--key_shards` left at None, Dataflow's default).

Not on the FnApiRunner: its watermark jumps to the end of a bounded replay, so
every ending timer fires and any layout ends holding no state.

    python bench/churn_bench.py [--events 1000000] [--keys 200000] [--active_min 5]

Prints keys ever seen, keys active within the horizon of the last event, and
state keys holding state; writes bench/results/churn_bench.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHURN_SPEC = ROOT / "bench" / "specs" / "churn.yaml"
sys.path.insert(0, str(ROOT))

from dofn_harness import Bytes, KeyState, fire_due, holds_state, next_timer_us  # noqa: E402  (bench/, this script's directory)

SECOND = 1_000_000
T0_US = 1_765_000_000 * SECOND
LATENESS_S = 600
WINDOW_S = 3600


def churn_spec():
    from transforms.spec import load_spec

    return load_spec(CHURN_SPEC)


def churn_events(events: int, keys: int, active_min: int, seconds_per_key: float, seed: int = 11) -> list:
    """`events` events over `keys` users, the n-th starting at n * seconds_per_key, each active
    `active_min` minutes; one in four is a request. In time order."""
    from transforms.events import Event

    rng = random.Random(seed)
    out = []
    for number in range(events):
        user = number % keys
        start = T0_US + int(user * seconds_per_key * SECOND)
        time_us = start + rng.randrange(active_min * 60) * SECOND
        if number % 4 == 3:
            out.append(Event(f"r{number}", "request", time_us, {"user": f"u{user}", "y": 0.0}))
        else:
            out.append(Event(f"c{number}", "click", time_us, {"user": f"u{user}", "amount": float(number % 50)}))
    out.sort(key=lambda event: event.time_us)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--active_min", type=int, default=5)
    parser.add_argument("--seconds_per_key", type=float, default=0.5, help="A new key every this many seconds.")
    args = parser.parse_args()
    from transforms.feature_layout import EventLayout, feature_groups
    from transforms.kept_histories import KEPT
    from transforms.unbounded_features import _POINTS, _PointInTimeDoFn, _Route

    spec = churn_spec()
    replay = churn_events(args.events, args.keys, args.active_min, args.seconds_per_key)
    groups = feature_groups(spec)
    layout = EventLayout.of(spec)
    empty = (None,) * len(spec.windowed_features)
    route, step = _Route(groups, None), _PointInTimeDoFn(groups, LATENESS_S, SECOND, None)
    states: dict[str, KeyState] = {}
    counted = Bytes()
    KEPT.clear()
    started = time.perf_counter()
    timers: list[tuple[int, str]] = []  # (when, state key): a state key's earliest timer, as last set

    def schedule(state_key: str, state: KeyState) -> None:
        at = next_timer_us(state)
        if at is not None:
            heapq.heappush(timers, (at, state_key))

    def advance_watermark(to_us: int) -> None:
        while timers and timers[0][0] <= to_us:
            _, state_key = heapq.heappop(timers)
            state = states.get(state_key)
            if state is not None:
                fire_due(step, state, to_us, key=state_key)
                schedule(state_key, state)
                if not holds_state(state):
                    del states[state_key]  # nothing left: a runner keeps nothing for it either

    last_step = None
    for event in replay:
        step_end = -(-event.time_us // SECOND)
        if last_step is not None and step_end != last_step:
            advance_watermark(last_step * SECOND)  # the watermark passes the last step
        last_step = step_end
        for output in route.process(layout.to_item(event, empty)):
            if output.tag == _POINTS:
                state_key, value = output.value
                state = states.get(state_key)
                if state is None:
                    state = states[state_key] = KeyState(_PointInTimeDoFn, counted)
                step.process((state_key, value), **state.arguments(step.process))
                schedule(state_key, state)
    advance_watermark(last_step * SECOND)
    seconds = time.perf_counter() - started
    end_us = replay[-1].time_us
    horizon_us = (WINDOW_S + LATENESS_S) * SECOND
    seen = {event.fields["user"] for event in replay}
    active = {event.fields["user"] for event in replay if event.time_us > end_us - horizon_us}
    held = sum(holds_state(state) for state in states.values())
    figures = {"events": len(replay), "keys_seen": len(seen), "keys_active_within_horizon": len(active),
               "state_keys_holding_state": held, "kept_in_memory": len(KEPT), "seconds": round(seconds, 1),
               "state_bytes_read": counted.read, "state_bytes_written": counted.written,
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"{len(replay):,} events over {len(seen):,} keys, each active {args.active_min} min, horizon "
          f"{(WINDOW_S + LATENESS_S) // 60} min: {seconds:.1f} s")
    print(f"  keys ever seen                        {len(seen):>9,}")
    print(f"  keys active within the horizon at end {len(active):>9,}")
    print(f"  state keys holding state at the end   {held:>9,}  ({held / len(active):.2f}x the active keys)")
    out = ROOT / "bench" / "results" / "churn_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()

"""A hot key: what a streamed event costs the point-in-time step when its
key's windows hold 1k, 10k or 100k observations.

The step's own DoFn (`_PointInTimeDoFn`, every feature group of the flights
spec, events routed by the job's `_Route`) is driven as a streaming runner
drives it with its state cache off, as Dataflow's Python workers run by
default: each state read fetches and decodes the bytes, each write encodes
them (Beam's coders of the DoFn's own state specs), and the event-time timer
fires once per one-second step. Every event has the same origin, carrier,
tailnum and dest: one key in each of the five groups. The windows are filled
first (N observations in one step), then M events come a second apart,
observations and requests in turn, all within the shortest window, so each
firing's windows hold N or more. The figures are per measured event: µs of
the DoFn's processing and firings, and the state bytes read and written.

Runners are left out on purpose (bench/dofn_harness.py says why;
bench/fnapi_streaming_bench.py measures the whole job on the FnApiRunner).

    python bench/hot_key_bench.py [--populations 1000,10000,100000] [--measured 2000]

Prints µs and state bytes per event at each population and
`slowest_over_fastest`; writes bench/results/hot_key_bench.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dofn_harness import Bytes, KeyState, fire_due  # noqa: E402  (bench/, this script's directory)

T0_US = 1_386_000_000_000_000  # 2013-12-02T16:00:00Z
SECOND = 1_000_000
KEYS = {"origin": "EWR", "carrier": "UA", "tailnum": "N14228", "dest": "IAH"}


def events(population: int, measured: int, seed: int = 7) -> list:
    """N observations in the second before T0, then `measured` events a second apart."""
    from transforms.events import Event

    rng = random.Random(seed)

    def observation(number: int, time_us: int) -> Event:
        return Event(f"o{number}", "observation", time_us, {**KEYS, "dep_delay": float(rng.randint(-20, 200))})

    out = [observation(n, T0_US - SECOND + n * SECOND // population) for n in range(population)]
    for step in range(measured):
        time_us = T0_US + step * SECOND + SECOND // 2  # each in a step of its own, after the filling's
        if step % 2:
            out.append(Event(f"r{step}", "request", time_us, {**KEYS, "month": 12, "hour": 16, "minute": 0,
                                                             "day_of_week": 0, "distance": 1400.0}))
        else:
            out.append(observation(population + step, time_us))
    return out


def drive(spec, replay: list, counted: Bytes) -> tuple[int, float]:
    """The replay through `_Route` and `_PointInTimeDoFn`, a timer firing per step -> (answers, seconds
    spent on the steps after T0: the measured events)."""
    from transforms.feature_layout import EventLayout, feature_groups
    from transforms.kept_histories import KEPT
    from transforms.unbounded_features import _POINTS, _PointInTimeDoFn, _Route

    groups = feature_groups(spec)
    layout = EventLayout.of(spec)
    empty = (None,) * len(spec.windowed_features)
    route = _Route(groups, None)
    step = _PointInTimeDoFn(groups, 3600, 1000 * 1000, None)
    states: dict[str, KeyState] = {}
    KEPT.clear()
    answers = 0
    by_step: dict[int, list] = {}
    for event in replay:
        by_step.setdefault(-(-event.time_us // SECOND), []).append(event)
    steps = sorted(by_step)
    timings = []
    for step_end in steps:
        started = time.perf_counter()
        for event in by_step[step_end]:
            for output in route.process(layout.to_item(event, empty)):
                if output.tag != _POINTS:
                    continue
                state_key, value = output.value
                state = states.get(state_key)
                if state is None:
                    state = states[state_key] = KeyState(_PointInTimeDoFn, counted)
                step.process((state_key, value), **state.arguments(step.process))
        for state_key, state in states.items():  # the watermark passes the step: due timers fire
            answers += len(fire_due(step, state, step_end * SECOND, key=state_key))
        if step_end * SECOND > T0_US:
            timings.append(time.perf_counter() - started)
    return answers, sum(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--populations", default="1000,10000,100000")
    parser.add_argument("--measured", type=int, default=2000, help="Events after the filling (default 2000).")
    args = parser.parse_args()
    from transforms.spec import load_spec

    spec = load_spec("flights")
    results = []
    print(f"{'window holds':>12} {'µs/event':>9} {'state read B/event':>19} {'written B/event':>16}")
    for population in map(int, args.populations.split(",")):
        replay = events(population, args.measured)
        filling = Bytes()
        drive(spec, replay[:population], filling)  # the same filling alone: its bytes, to leave out
        counted = Bytes()
        gc.collect()
        answers, seconds = drive(spec, replay, counted)
        requests = args.measured // 2
        assert answers == requests * len(KEYS) + requests, answers  # each request answered by all five groups
        figures = {"population": population, "us_per_event": 1e6 * seconds / args.measured,
                   "state_read_bytes_per_event": (counted.read - filling.read) / args.measured,
                   "state_written_bytes_per_event": (counted.written - filling.written) / args.measured}
        results.append(figures)
        print(f"{population:>12,} {figures['us_per_event']:>9,.0f} {figures['state_read_bytes_per_event']:>19,.0f} "
              f"{figures['state_written_bytes_per_event']:>16,.0f}", flush=True)
    costs = [r["us_per_event"] for r in results]
    slowest_over_fastest = max(costs) / min(costs)
    print(f"slowest_over_fastest {slowest_over_fastest:.2f} (target: at most 2)")
    out = ROOT / "bench" / "results" / "hot_key_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "slowest_over_fastest": round(slowest_over_fastest, 3),
                               "measured": args.measured, "load_average": os.getloadavg()[0],
                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()

"""The feature engine per request, against the window's population, in one run:
microseconds per request for one busy key whose 30-day windows hold 1k, 10k,
100k and 1M observations, with the engine that scans each window
(tests/scan_engine.py, the reference) and the one that does not
(transforms/point_in_time.py over transforms/window_index.py).

One feature per aggregate (count, sum, mean, min, max, stddev, ratio, last,
time_since_last, last_k, count_distinct), all over 30 days. The key's
observations (delays with fractions, a destination among 300) are spread
evenly over 30 days and applied in time order; then requests arrive in time
order over the next hour, each applied alone (`KeyHistory.apply`, so the
windows slide and old observations are evicted as in a job), and each is
timed. The figure is the median per request; both engines' answers are
compared bit for bit on every timed request.

    python bench/engine_bench.py                       # 1k, 10k, 100k, 1M
    python bench/engine_bench.py --sizes 1000 100000   # a quicker run

Target: the new engine's curve is flat within 2x from 1k to 1M.
Writes bench/results/engine_bench.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.scan_engine import ScanKeyHistory, bits  # noqa: E402
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent  # noqa: E402
from transforms.spec import WindowedFeature  # noqa: E402

DAY_S, US = 86_400, 1_000_000
WINDOW_S = 30 * DAY_S
TARGET_FLATNESS = 2.0
KEY = ("tailnum",)
FEATURES = tuple(WindowedFeature(f"{aggregate}_30d", KEY, aggregate, WINDOW_S, field, per, k=k)
                 for aggregate, field, per, k in [
                     ("count", None, None, None), ("sum", "delay", None, None), ("mean", "delay", None, None),
                     ("min", "delay", None, None), ("max", "delay", None, None), ("stddev", "delay", None, None),
                     ("ratio", "delay", "seats", None), ("last", "delay", None, None),
                     ("time_since_last", None, None, None), ("last_k", "delay", None, 5),
                     ("count_distinct", "dest", None, None)])


def observations(n: int, seed: int = 7) -> list[PendingEvent]:
    """n observations of one key spread evenly over the 30 days before day 30."""
    rng = random.Random(seed)
    series = KeyHistory(FEATURES).series  # the order the engine reads values in
    out = []
    for i in range(n):
        row = {"delay": round(rng.gauss(10, 40), 2), "dest": f"D{rng.randrange(300):03d}",
               "seats": float(rng.choice([50, 76, 150, 180]))}
        values = tuple(row[s[0]] if len(s) == 1 else tuple(row[name] for name in s) for s in series)
        out.append(PendingEvent(i * WINDOW_S * US // n, OBSERVATION, f"o{i:07d}", values))
    return out


def requests(count: int, seed: int = 11) -> list[PendingEvent]:
    """Requests in time order over the hour after day 30: every window holds about n observations."""
    rng = random.Random(seed)
    times = sorted(WINDOW_S * US + rng.randrange(3_600 * US) for _ in range(count))
    return [PendingEvent(t, REQUEST, f"r{i:05d}", ()) for i, t in enumerate(times)]


def measure(engine, history_events: list[PendingEvent], timed: list[PendingEvent]) -> tuple[list[float], list]:
    history = engine(FEATURES)
    history.apply(history_events)
    per_request, answers = [], []
    for request in timed:
        start = time.perf_counter()
        answer = history.apply([request])[0]
        per_request.append((time.perf_counter() - start) * 1e6)
        answers.append(answer[0][1])
    return per_request, answers




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000],
                        help="observations in the 30-day window (default: 1k 10k 100k 1M)")
    parser.add_argument("--requests", type=int, default=2_000, help="timed requests per size for the new engine")
    parser.add_argument("--budget_s", type=float, default=5.0,
                        help="about how long the scan engine is timed per size (fewer requests at large sizes)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "engine_bench.json"))
    args = parser.parse_args(argv)

    rows = []
    print(f"{len(FEATURES)} features over 30 days on one key; median us per request", flush=True)
    print(f"{'observations':>12} {'scan (old) us':>14} {'new us':>9} {'old/new':>8} {'timed old/new':>14}")
    for n in args.sizes:
        history_events, timed = observations(n), requests(args.requests)
        new_us, new_answers = measure(KeyHistory, history_events, timed)
        # The scan engine: as many requests as fit the budget, from a first one timed alone.
        probe, _ = measure(ScanKeyHistory, history_events, timed[:1])
        old_count = max(3, min(len(timed), int(args.budget_s * 1e6 / max(probe[0], 1.0))))
        old_us, old_answers = measure(ScanKeyHistory, history_events, timed[:old_count])
        assert bits(old_answers) == bits(new_answers[:old_count]), f"the engines disagree at {n} observations"
        row = {"observations": n, "old_us": statistics.median(old_us), "new_us": statistics.median(new_us),
               "old_requests": old_count, "new_requests": len(timed)}
        row["speedup"] = row["old_us"] / row["new_us"]
        rows.append(row)
        print(f"{n:>12,} {row['old_us']:>14,.1f} {row['new_us']:>9,.1f} {row['speedup']:>7,.0f}x "
              f"{old_count:>7}/{len(timed)}", flush=True)
    flatness = max(r["new_us"] for r in rows) / min(r["new_us"] for r in rows)
    growth = rows[-1]["old_us"] / rows[0]["old_us"]
    ok = flatness <= TARGET_FLATNESS
    print(f"new engine, slowest / fastest size: {flatness:.2f}x (target <= {TARGET_FLATNESS:.0f}x: "
          f"{'ok' if ok else 'MISSED'}); scan engine: {growth:,.0f}x from {rows[0]['observations']:,} "
          f"to {rows[-1]['observations']:,}; answers bit-identical on every request timed on both")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"rows": rows, "flatness": flatness, "target": TARGET_FLATNESS,
                                             "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

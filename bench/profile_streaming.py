"""Where a streamed event's time goes: the replay of `fnapi_streaming_bench.py`
(the streaming job's own steps on the FnApiRunner, state cache off as on
Dataflow) under cProfile, summed into the job's parts, with calls per event.

    python bench/profile_streaming.py [--model output/model] [--events 8000] [--state_cache_mb 0]

Prints one line per part: seconds (cumulative, so parts nest: a step's time
includes the state calls it makes), % of the run, µs per event and calls per
event; then RunInference's batch sizes; writes the full profile to
bench/results/profile_streaming.prof (read it with `python -m pstats`).
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import os
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (part, the functions whose cumulative time is the part's: "module:Class.method" or "module:function").
PARTS = (
    ("parse (ParseEvents, live checks)", ("transforms.parse:_ParseDoFn.process",)),
    ("de-duplication ledger", ("transforms.deduplicate:_DeduplicateLive.process",
                               "transforms.deduplicate:_DeduplicateLive.on_forget")),
    ("route to groups", ("transforms.unbounded_features:_Route.process",)),
    ("point-in-time: buffer events", ("transforms.unbounded_features:_PointInTimeDoFn.process",)),
    ("point-in-time: timer firings", ("transforms.unbounded_features:_PointInTimeDoFn._release",)),
    ("  engine (KeyHistory.apply)", ("transforms.point_in_time:KeyHistory.apply",)),
    ("  histories read back from the log", ("transforms.history_log:histories_from_log",)),
    ("  log entries (deltas, compaction)", ("transforms.history_log:next_entries",
                                            "transforms.history_log:delta_entry")),
    ("join of groups", ("transforms.unbounded_features:_JoinGroupsDoFn.process",)),
    ("encoder (rows -> tf.Example)", ("transforms.examples:_EncodeKeyedBatchDoFn.process",)),
    ("RunInference (model calls)", ("models.inference:SavedModelHandler.run_inference",)),
    ("prediction / served / event rows", ("beam_app.serving.rows:ToPredictionRows.process",
                                          "beam_app.serving.rows:ToEventRows.process")),
    ("state: reads", ("apache_beam.runners.worker.sdk_worker:GlobalCachingStateHandler.blocking_get",)),
    ("state: appends", ("apache_beam.runners.worker.sdk_worker:GlobalCachingStateHandler.extend",)),
    ("state: clears", ("apache_beam.runners.worker.sdk_worker:GlobalCachingStateHandler.clear",)),
    ("state cache weighing (objsize)", ("apache_beam.runners.worker.statecache:get_deep_size",)),
)


def _code_of(target: str) -> tuple[str, int, str]:
    """"module:Class.method" -> cProfile's key for it: (file, first line, name)."""
    import importlib
    import inspect

    module, _, path = target.partition(":")
    obj = importlib.import_module(module)
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return ("", 0, "")  # not in this version of the code: the part reads 0
    obj = inspect.unwrap(obj)
    return obj.__code__.co_filename, obj.__code__.co_firstlineno, obj.__code__.co_name


def part_figures(stats: pstats.Stats) -> list[tuple[str, float, int]]:
    """(part, cumulative seconds, calls) per part."""
    rows = []
    for part, targets in PARTS:
        seconds = calls = 0
        for target in targets:
            figures = stats.stats.get(_code_of(target))
            if figures:
                seconds += figures[3]
                calls += figures[1]
        rows.append((part, seconds, calls))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "output" / "model"))
    parser.add_argument("--spec", default="flights")
    parser.add_argument("--events", type=int, default=8000)
    parser.add_argument("--state_cache_mb", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("NO_GCE_CHECK", "true")
    import fnapi_streaming_bench as bench
    from beam_app.common.options import quiet_tensorflow
    from models.inference import locate_model
    from transforms.spec import load_spec

    quiet_tensorflow()
    spec = load_spec(args.spec)
    model = locate_model(args.model).saved_model
    events = bench.load_replay(spec, bench.START_TIME, args.events)
    batch_sizes = collections.Counter()
    from models import inference

    run_inference = inference.SavedModelHandler.run_inference

    def counted(self, batch, model, inference_args=None):
        batch_sizes[len(batch)] += 1
        return run_inference(self, batch, model, inference_args)

    inference.SavedModelHandler.run_inference = counted
    profile = cProfile.Profile()
    profile.enable()
    run = bench.replay(spec, model, events, 1024, args.state_cache_mb)
    profile.disable()
    out = ROOT / "bench" / "results" / "profile_streaming.prof"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.dump_stats(out)
    stats = pstats.Stats(profile)
    total = stats.total_tt
    n = run["events"]
    print(f"{n:,} events ({run['requests']:,} requests), state cache {args.state_cache_mb} MB: "
          f"{run['seconds']:.2f} s under the profiler, {total:.2f} s profiled; rows {run['rows']}")
    print(f"  {'part':<36} {'s':>7} {'%':>5} {'µs/event':>9} {'calls/event':>12}")
    for part, seconds, calls in part_figures(stats):
        print(f"  {part:<36} {seconds:>7.2f} {100 * seconds / total:>5.1f} {1e6 * seconds / n:>9.0f} "
              f"{calls / n:>12.2f}")
    sizes = sorted(batch_sizes.elements())
    if sizes:
        print(f"  RunInference: {len(sizes)} model calls, batch size mean {sum(sizes) / len(sizes):.1f}, "
              f"min {sizes[0]}, median {sizes[len(sizes) // 2]}, max {sizes[-1]}")
    print(f"profile: {out}")


if __name__ == "__main__":
    main()

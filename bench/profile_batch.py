"""Where the batch job's time goes: the job under cProfile, grouped by stage.

Runs `beam_app.batch` in this process with ONE in-memory worker
(--direct_num_workers 1 --direct_running_mode in_memory), because cProfile
sees only its own process and thread: the default job runs two worker
processes, which this does not profile. Then prints

- the job's own summary (records, events, feature rows, examples per split)
  and the elements of every PCollection (Beam's element counts);
- the profile's self time grouped into stages by the file of each function
  (`STAGES` below). Time spent in the standard library, builtins and other
  libraries is charged to the stage of whoever called them, split by the
  call edges cProfile records: approximate where a library is called from
  several stages. Beam's Cython parts (coders, DoFn invocation, operations,
  windowed values) are invisible to cProfile: their time shows as self time
  of the Python frame below them, mostly Beam's bundle processor and worker
  (the "beam per-element" stages) but also the user function they invoke;
- the top functions by self time (tottime), with their files.

cProfile itself slows Python-heavy code by roughly 1.5-2x, so read the
shares, not the seconds, as the job's. For sampling the real multi-process
job instead: py-spy record --subprocesses -o out.txt -f raw -- python -m beam_app.batch ...

    python bench/profile_batch.py                                # flights, output in a temp dir
    python bench/profile_batch.py --spec chicago_taxi --output /tmp/taxi
    python bench/profile_batch.py --save /tmp/batch.prof -- --no_stats   # after --: more job flags
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (stage, path fragments): the first stage with a fragment in a function's file takes its self time.
STAGES = (
    ("read: files, zip, CSV lines (read_files, adapters)",
     ("transforms/read_files.py", "beam_app/adapters/", "transforms/adapters.py", "/zipfile", "/csv.py")),
    # transforms/events.py (Event, event_to_json) is charged to its callers: parse and deduplicate both use it.
    ("parse + validate (parse)", ("transforms/parse.py", "transforms/event_time.py")),
    ("deduplicate", ("transforms/deduplicate.py",)),
    ("feature engine: scatter, join, rows (bounded_features, feature_layout)",
     ("transforms/bounded_features.py", "transforms/feature_layout.py", "transforms/gather.py",
      "transforms/windowed_features.py", "transforms/unbounded_features.py")),
    ("feature engine: answers (columnar_windows, point_in_time, numpy)",
     ("transforms/columnar_windows.py", "transforms/point_in_time.py", "transforms/window_index.py", "numpy/")),
    ("split", ("transforms/split.py",)),
    ("example encoder (examples: rows -> Arrow -> tfx-bsl)", ("transforms/examples.py", "tfx_bsl/", "pyarrow/")),
    ("statistics (feature_stats)", ("transforms/feature_stats.py",)),
    ("job setup + summary (beam_app/batch.py)", ("beam_app/",)),  # spec.py: charged to callers
    ("writes: TFRecord gzip, text sinks", ("apache_beam/io/", "transforms/tfrecord_files.py", "/gzip.py")),
    ("beam shuffle/GBK/combine (fn_api_runner buffers, combiners)",
     ("apache_beam/runners/portability/fn_api_runner/", "apache_beam/transforms/combiners.py",
      "apache_beam/transforms/trigger.py", "apache_beam/transforms/util.py")),
    ("beam coders + pickling", ("apache_beam/coders/", "apache_beam/internal/", "/dill/", "/cloudpickle/",
                                "/pickle.py", "/copyreg.py")),
    ("beam per-element: bundle processor, DoFn runner, metrics",
     ("apache_beam/runners/worker/", "apache_beam/runners/common", "apache_beam/transforms/core.py",
      "apache_beam/metrics/", "apache_beam/utils/", "apache_beam/transforms/window")),
    ("beam other (pipeline construction, runner API, typehints)", ("apache_beam/",)),
    ("imports", ("<frozen importlib", "importlib/")),
)
UNCHARGED = "uncharged library time (no classified caller)"


def stage_of(func: tuple) -> str | None:
    """The stage of a pstats function key (file, line, name); None: a library, charged to its callers."""
    path = func[0].replace(os.sep, "/")
    if func[0] == "~":  # a builtin: {method 'x' of 'y'} / {built-in method z}
        return None
    for stage, fragments in STAGES:
        if any(fragment in path for fragment in fragments):
            return stage
    return None


def by_stage(stats: pstats.Stats) -> dict[str, float]:
    """Self time per stage; an unclassified function's self time is passed up its call edges."""
    raw = stats.stats  # func -> (cc, nc, tt, ct, callers{caller: (cc, nc, tt, ct)})
    memo: dict[tuple, dict[str, float]] = {}

    def shares(func) -> dict[str, float]:
        """Where a function's time is charged: {stage: fraction}."""
        stage = stage_of(func)
        if stage is not None:
            return {stage: 1.0}
        if func in memo:  # done, or in progress (a recursion cycle: that share stays uncharged)
            return memo[func]
        memo[func] = {UNCHARGED: 1.0}
        callers = raw.get(func, (0, 0, 0, 0, {}))[4]
        weights = {caller: edge[3] or edge[2] for caller, edge in callers.items() if caller != func}
        total = sum(weights.values())
        if total:
            result: dict[str, float] = defaultdict(float)
            for caller, weight in weights.items():
                for name, share in shares(caller).items():
                    result[name] += share * weight / total
            memo[func] = dict(result)
        return memo[func]

    totals: dict[str, float] = defaultdict(float)
    for func, (_, _, tottime, _, _) in raw.items():
        for name, share in shares(func).items():
            totals[name] += tottime * share
    return dict(totals)


def element_counts(result, proto) -> list[tuple[str, int]]:
    """Elements per PCollection (its producing step's name), from Beam's monitoring infos."""
    from apache_beam.metrics import monitoring_infos

    # unique_name is "<n><step>.<tag>"; ids the proto lacks are the runner's own (lifted combines): left out.
    names = {pid: re.sub(r"^\d+", "", pc.unique_name) for pid, pc in proto.components.pcollections.items()}
    counts: dict[str, int] = defaultdict(int)
    for info in result.monitoring_infos():
        pid = info.labels.get(monitoring_infos.PCOLLECTION_LABEL)
        if info.urn == monitoring_infos.ELEMENT_COUNT_URN and pid in names:
            counts[names[pid]] += monitoring_infos.extract_counter_value(info)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="flights", help="the job's --spec (default: flights)")
    parser.add_argument("--output", default=None,
                        help="passed to the job as --output (default: a fresh temporary directory)")
    parser.add_argument("--top", type=int, default=25, help="how many functions to list by self time (default 25)")
    parser.add_argument("--save", default=None, help="also write the raw profile here (for pstats or snakeviz)")
    parser.add_argument("job_args", nargs="*", help="after --: more flags for the job, e.g. --no_stats")
    args = parser.parse_args()

    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from beam_app import batch
    from beam_app.common.options import quiet_tensorflow

    quiet_tensorflow()
    output = args.output or tempfile.mkdtemp(prefix="profile_batch_")
    argv = ["--runner", "DirectRunner", "--direct_num_workers", "1", "--direct_running_mode", "in_memory",
            "--spec", args.spec, "--output", output, *args.job_args]

    captured = {}  # the pipeline proto (PCollection names) and the result (element counts)
    run_via_runner_api, counters = fn_runner.FnApiRunner.run_via_runner_api, batch.job_counters

    def capture_proto(self, proto, options):
        captured["proto"] = proto
        return run_via_runner_api(self, proto, options)

    def capture_result(result):
        captured["result"] = result
        return counters(result)

    fn_runner.FnApiRunner.run_via_runner_api, batch.job_counters = capture_proto, capture_result

    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    try:
        batch.run(argv)
    finally:
        profile.disable()
        fn_runner.FnApiRunner.run_via_runner_api, batch.job_counters = run_via_runner_api, counters
    wall = time.perf_counter() - started
    if args.save:
        profile.dump_stats(args.save)

    stats = pstats.Stats(profile)
    total = sum(entry[2] for entry in stats.stats.values())
    print(f"\nprofiled wall {wall:.1f} s, self time {total:.1f} s (one in-memory worker, under cProfile); "
          f"output in {output}")

    if "result" in captured and "proto" in captured:
        print("\nelements per PCollection, over 1,000 (Beam's element counts)")
        for name, count in element_counts(captured["result"], captured["proto"]):
            if count > 1000:
                print(f"  {count:>10,}  {name}")

    print(f"\n{'stage':<66} {'self s':>8} {'%':>6}")
    for stage, seconds in sorted(by_stage(stats).items(), key=lambda item: -item[1]):
        print(f"{stage:<66} {seconds:>8.1f} {100 * seconds / total:>5.1f}%")

    print(f"\ntop {args.top} functions by self time\n{'tottime':>8} {'%':>6} {'cumtime':>8} {'calls':>11}  function")
    top = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:args.top]
    for (path, line, name), (_, calls, tottime, cumtime, _) in top:
        where = name if path == "~" else f"{name}  {_short(path)}:{line}"
        print(f"{tottime:>8.2f} {100 * tottime / total:>5.1f}% {cumtime:>8.2f} {calls:>11,}  {where}")


def _short(path: str) -> str:
    path = path.replace(os.sep, "/")
    for marker in ("site-packages/", str(ROOT).replace(os.sep, "/") + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return re.sub(r"^.*/lib/python3\.\d+/", "", path)


if __name__ == "__main__":
    main()

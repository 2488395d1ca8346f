"""RunInference benchmark: the exported model served by Beam's RunInference in
batch pipelines, against the same model's signature called directly, in one
session, at each of --examples (default 100,000 and 320,000) serialized
tf.Examples (the batch job's eval, then test, then train records; it holds
about 328k):

1. reference: the SavedModel loaded once (`load_checked_model`) and its
   `serving_default` signature called on batches of --batch_size examples
   (list of bytes -> tf.constant -> signature -> numpy), timed after one
   warm-up batch; run before each pipeline and once at the end of each size
   (other work on the machine changes it from run to run), ratios are to the
   median of that size;
2. `RunInference(SavedModelHandler(...))` as the streaming job runs it: on
   KeyedBatches of --batch_size examples keyed by string ids (what
   `EncodeExamples` emits there), one model call and one
   KeyedPredictions output per batch; the source (below) yields the batches;
3. the same on the keyed examples one by one, batched by `KeyedBatches`
   (BatchElements) in the pipeline, with adaptive sizing (min_batch_size=1,
   max_batch_size=--batch_size) and with fixed batches (min = max =
   --batch_size): what Beam's per-element cost adds in front of the model;
4. an identity `beam.Map` on the keyed examples one by one: what Beam itself
   costs per element, for scale.

Pipelines run on the FnApiRunner (the DirectRunner's batch engine) in this
process with one worker. Each is timed end to end (pipeline construction,
model load, everything): "cold". The model load is a cost per worker, not
per example (a worker keeps its model for the life of the job), and at
100k examples it takes about as long as the signature's calls; so each run
also gives "warm": examples / (wall - model load), the load as
RunInference's own metric measured it. The 0.8x target is on warm; cold is
printed beside it. Batch sizes, model load and time inside the handler come
from RunInference's metrics.

The source is a FlatMap reading the elements from a local pickle file
written before the timing (`--create` adds the same pipelines on
`beam.Create`, which pickles and bz2-compresses all its values into the
pipeline graph: slow to build, not a fair source). Every pipeline ends in
the same step, which collects (key, prediction, model version) per request
in this process, from one element per request (identity) or from one
KeyedPredictions per batch (RunInference: in the job, the step after it
gives each request its row); every RunInference prediction is then checked
against the direct one within rel 1e-5, abs 1e-5. Batches of the same sizes
as the direct ones give bit-identical predictions; in batches of other sizes
(adaptive sizing) the same example was seen up to 1.5e-6 apart (a few ulps
of the larger sums inside the model).

    python bench/inference_bench.py [--data_dir output] [--examples 100000,320000] [--batch_size 1024] [--create]

runs the batch job first if data_dir has no batch output, and trains a quick
model (2 epochs, no baseline model) if data_dir/model has none. Writes
bench/results/inference_bench.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import repeat
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_bench import ensure_batch_output  # noqa: E402

TARGET_RATIO = 0.8
REL, ABS = 1e-5, 1e-5  # float32 kernels round an example ~1e-6 apart in batches of other sizes


def ensure_model(data_dir: Path) -> None:
    if (data_dir / "model" / "LATEST").exists():
        return
    print(f"no model in {data_dir / 'model'}: training a quick one (2 epochs, no baseline model) ...", flush=True)
    subprocess.run([sys.executable, "-m", "models.train", "--data_dir", str(data_dir), "--epochs", "2",
                    "--no_baseline_model"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_examples(data_dir: Path, count: int) -> list[bytes]:
    import tensorflow as tf

    from models.data import split_files

    examples: list[bytes] = []
    for split in ("eval", "test", "train"):
        records = tf.data.TFRecordDataset(split_files(str(data_dir), split), compression_type="GZIP")
        examples += [record.numpy() for record in records.take(count - len(examples))]
        if len(examples) == count:
            return examples
    sys.exit(f"{data_dir} holds only {len(examples):,} examples; ask for fewer with --examples")


def direct(model, examples: list[bytes], batch_size: int) -> tuple[dict, list[float]]:
    import tensorflow as tf

    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    model.serve(examples=tf.constant(batches[0]))  # warm up
    started = time.monotonic()
    predictions = [model.serve(examples=tf.constant(batch))["prediction"].numpy() for batch in batches]
    seconds = time.monotonic() - started
    return {"seconds": round(seconds, 2), "examples_per_s": round(len(examples) / seconds)}, \
        [float(value) for chunk in predictions for value in chunk]


class Collect:
    """The last step of every pipeline: keeps (key, prediction, model version)
    per request in this process (the FnApiRunner runs the pipeline here), from
    a KeyedPredictions (one per batch) or a keyed element (identity). Plain
    tuples of atomic values, which the garbage collector stops tracking:
    keeping 100k PredictionResults alive would add full collections to the
    timing."""

    outputs: dict[str, list] = {}

    def __init__(self, name: str):
        self.name = name
        Collect.outputs[name] = []

    def __call__(self, element) -> None:
        from models.inference import KeyedPredictions

        if isinstance(element, KeyedPredictions):
            Collect.outputs[self.name].extend(zip(element.keys, element.predictions, repeat(element.model_version)))
        else:
            Collect.outputs[self.name].append((element[0], None, None))


def read_pickled(path: str):
    with open(path, "rb") as f:
        yield from pickle.load(f)


def run_pipeline(name: str, source, transform) -> tuple[dict, list, object]:
    """source: the elements (beam.Create) or the path of a pickle file holding them."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    gc.collect()
    started = time.monotonic()
    pipeline = beam.Pipeline(runner=FnApiRunner())
    if isinstance(source, list):
        elements = pipeline | "Create" >> beam.Create(source)
    else:
        elements = pipeline | "Paths" >> beam.Create([source]) | "Read" >> beam.FlatMap(read_pickled)
    _ = elements | name >> transform | "Collect" >> beam.Map(Collect(name))
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.monotonic() - started
    outputs = Collect.outputs.pop(name)
    return {"seconds": round(seconds, 2), "examples_per_s": round(len(outputs) / seconds)}, outputs, result


def inference_metrics(result) -> dict:
    from apache_beam.metrics.metric import MetricsFilter

    found = {}
    for name in ("inference_request_batch_size", "inference_batch_latency_micro_secs", "load_model_latency_milli_secs"):
        query = result.metrics().query(MetricsFilter().with_namespace("inference").with_name(name))
        found[name] = query["distributions"][0].committed
    sizes = found["inference_request_batch_size"]
    return {"batches": sizes.count, "mean_batch_size": round(sizes.mean), "smallest_batch": sizes.min,
            "model_load_s": round(found["load_model_latency_milli_secs"].sum / 1e3, 2),
            "in_run_inference_s": round(found["inference_batch_latency_micro_secs"].sum / 1e6, 2)}


def check(outputs: list, expected: dict[str, float], version: str) -> dict:
    got = {key: (value, model_id) for key, value, model_id in outputs}
    diffs = {key: abs(got[key][0] - value) for key, value in expected.items() if key in got}
    worst = max(diffs, key=lambda key: diffs[key] / max(abs(expected[key]), ABS / REL))
    bad = [key for key, value in expected.items()
           if key not in got or got[key][1] != version or diffs[key] > max(REL * abs(value), ABS)]
    return {"outputs": len(outputs), "mismatches": len(bad), "first_mismatches": bad[:5],
            "bit_identical": sum(diff == 0 for diff in diffs.values()),
            "worst": {"key": worst, "direct": expected[worst], "run_inference": got[worst][0]},
            "ok": len(outputs) == len(got) == len(expected) and not bad}


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def measure(count: int, examples: list[bytes], model, model_path: str, spec, batch_size: int, create: bool,
            tmp: Path) -> dict:
    """Every pipeline at `count` examples, with the direct references between them."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    from models.inference import KeyedBatches, SavedModelHandler
    from transforms.examples import keyed_batch

    examples = examples[:count]
    keyed = [(f"example-{i:07d}", example) for i, example in enumerate(examples)]
    batches = [keyed_batch(keyed[i:i + batch_size]) for i in range(0, count, batch_size)]
    references = []  # direct runs, one before each pipeline and one at the end: the machine's load drifts

    def reference() -> list[float]:
        gc.collect()
        timing, predictions = direct(model, examples, batch_size)
        references.append(timing)
        return predictions

    print(f"{count:,} examples: serving_default called directly ...", flush=True)
    expected = {key: value for (key, _), value in zip(keyed, reference())}
    sources = {}
    for what, elements in (("keyed batches", batches), ("keyed examples", keyed)):
        path = tmp / f"{what.replace(' ', '_')}-{count}.pickle"
        with open(path, "wb") as f:
            pickle.dump(elements, f)
        sources[what] = [("file", str(path))] + ([("Create", elements)] if create else [])
    # (name, elements, transform factory, min_batch_size); None: the identity Map
    plans = [("RunInference on KeyedBatches", "keyed batches", lambda: RunInference(SavedModelHandler(model_path, spec)),
              batch_size),
             ("KeyedBatches + RunInference, adaptive batches", "keyed examples",
              lambda: KeyedBatches(1, batch_size) | RunInference(SavedModelHandler(model_path, spec)), 1),
             ("KeyedBatches + RunInference, fixed batches", "keyed examples",
              lambda: KeyedBatches(batch_size, batch_size) | RunInference(SavedModelHandler(model_path, spec)),
              batch_size),
             ("identity Map", "keyed examples", None, None)]
    runs = {}
    for source_name in ("file", "Create") if create else ("file",):
        for plan_name, what, transform, min_batch in plans:
            source = dict(sources[what])[source_name]
            name = f"{source_name}, {plan_name}"
            print(f"{count:,} examples: {name} ...", flush=True)
            reference()
            if transform is None:
                runs[name], _, _ = run_pipeline("Identity", source, beam.Map(lambda element: element))
                continue
            timing, outputs, result = run_pipeline("RunInference", source, transform())
            metrics = inference_metrics(result)
            warm_s = timing["seconds"] - metrics["model_load_s"]
            runs[name] = {**timing, **metrics, "warm_examples_per_s": round(len(outputs) / warm_s),
                          "min_batch_size": min_batch, "check": check(outputs, expected, model.version)}
    reference()
    speeds = sorted(r["examples_per_s"] for r in references)
    median = statistics.median(speeds)
    for run in runs.values():
        run["ratio"] = round(run["examples_per_s"] / median, 2)
        if "warm_examples_per_s" in run:
            run["warm_ratio"] = round(run["warm_examples_per_s"] / median, 2)
    return {"examples": count, "direct": {"median_examples_per_s": median, "runs": references}, "pipelines": runs}


def report(size: dict, batch_size: int) -> str:
    count, median = size["examples"], size["direct"]["median_examples_per_s"]
    speeds = sorted(r["examples_per_s"] for r in size["direct"]["runs"])

    def row(name: str, r: dict) -> str:
        if "check" not in r:
            return f"| {name} | {r['examples_per_s']:,} | {r['ratio']:.2f} | | | | {r['seconds']} s | | |"
        return (f"| {name} | {r['examples_per_s']:,} | {r['ratio']:.2f} | {r['warm_examples_per_s']:,} "
                f"| **{r['warm_ratio']:.2f}** (>= {TARGET_RATIO}: {verdict(r['warm_ratio'] >= TARGET_RATIO)}) "
                f"| {r['mean_batch_size']:,} ({r['batches']} batches) | {r['seconds']} s | {r['model_load_s']} s "
                f"| {r['in_run_inference_s']} s |")

    def described(c: dict) -> str:
        text = f"{verdict(c['ok'])} ({c['outputs']:,} outputs, {c['mismatches']} mismatches, " \
               f"{c['bit_identical']:,} bit-identical"
        if c["bit_identical"] < c["outputs"]:
            w = c["worst"]
            text += f"; farthest apart: {w['key']}, direct {w['direct']!r}, RunInference {w['run_inference']!r}"
        return text + ")"

    runs = size["pipelines"]
    rows = "\n".join(row(name, r) for name, r in runs.items())
    checks = "\n".join(f"- {name}: {described(r['check'])}" for name, r in runs.items() if "check" in r)
    return f"""
{count:,} examples, batches of {batch_size}

| examples/s of | cold examples/s | cold ratio | warm examples/s | warm ratio (target) | mean batch size \
| wall | model load | in run_inference |
|---|---|---|---|---|---|---|---|---|
| serving_default called directly: median of {len(speeds)} runs between the pipelines (slowest, fastest) \
| {median:,.0f} ({speeds[0]:,}, {speeds[-1]:,}) | 1.00 | | reference | {batch_size} | {count / median:.2f} s | | |
{rows}

RunInference predictions equal to the direct ones (rel {REL}, abs {ABS}) for every example:
{checks}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT / "output"))
    parser.add_argument("--examples", default="100000,320000",
                        help="comma-separated example counts, each measured in this run (default 100000,320000)")
    parser.add_argument("--batch_size", type=int, default=1024, help="examples per model call (default 1024)")
    parser.add_argument("--create", action="store_true", help="also run every pipeline on beam.Create")
    args = parser.parse_args()
    counts = [int(count) for count in args.examples.split(",")]
    data_dir = Path(args.data_dir).resolve()
    ensure_batch_output(data_dir)
    ensure_model(data_dir)

    from models.features import training_spec
    from models.inference import load_checked_model

    spec = training_spec(data_dir)
    model_path = str(data_dir / "model")
    examples = read_examples(data_dir, max(counts))
    load_avg = os.getloadavg()[0]
    print(f"{len(examples):,} examples read, sizes {', '.join(f'{c:,}' for c in counts)}, batch size "
          f"{args.batch_size}, load average {load_avg:.2f} on {os.cpu_count()} CPUs", flush=True)
    model = load_checked_model(model_path, spec)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [measure(count, examples, model, model_path, spec, args.batch_size, args.create, Path(tmp))
                 for count in counts]

    print(f"\nPipelines on the FnApiRunner in this process, one worker; load average {load_avg:.2f} on "
          f"{os.cpu_count()} CPUs at start. Cold: the whole pipeline's wall; warm: wall less the model load "
          "(once per worker). Ratios to the direct median of the same size.")
    for size in sizes:
        print(report(size, args.batch_size))
    target = "RunInference on KeyedBatches"
    for size in sizes:
        run = next(r for name, r in size["pipelines"].items() if name.endswith(target))
        print(f"{target} at {size['examples']:,} examples: warm {run['warm_ratio']:.2f}x, cold {run['ratio']:.2f}x "
              f"of the signature called directly; target >= {TARGET_RATIO}x warm: "
              f"{verdict(run['warm_ratio'] >= TARGET_RATIO)}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    results = {"batch_size": args.batch_size, "load_average": load_avg, "cpus": os.cpu_count(),
               "model_version": model.version, "target_ratio": TARGET_RATIO, "sizes": sizes}
    (out / "inference_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out / 'inference_bench.json'}")


if __name__ == "__main__":
    main()

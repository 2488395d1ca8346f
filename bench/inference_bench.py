"""RunInference benchmark: the exported model served by Beam's RunInference in
a batch pipeline, against the same model's signature called directly, in one
session on the same 100,000 serialized tf.Examples (the batch job's eval, then
test, then train records):

1. reference: the SavedModel loaded once (`load_checked_model`) and its
   `serving_default` signature called on batches of --batch_size examples
   (list of bytes -> tf.constant -> signature -> numpy), timed after one
   warm-up batch; run before each pipeline and once at the end (other work
   on the machine changes it from run to run), ratios are to the median;
2. `RunInference(KeyedModelHandler(SavedModelHandler(...)))` on the examples
   keyed by string ids (as the streaming job keys them), on the FnApiRunner
   (the DirectRunner's batch engine) in this process with one worker, timed
   end to end (pipeline construction, model load, everything), with
   BatchElements' adaptive sizing (min_batch_size=1, max_batch_size=--batch_size)
   and with fixed batches (min = max = --batch_size); batch sizes, model load
   and time inside the handler come from RunInference's own metrics;
3. the same pipeline with an identity `beam.Map` instead of RunInference: what
   Beam itself costs on these elements.

Each pipeline runs on two sources of the same keyed examples: `beam.Create`
(which pickles and bz2-compresses all its values into the pipeline graph) and a
FlatMap reading them from a local pickle file written before the timing.
Every pipeline ends in the same step, which collects (key, prediction) in this
process; every RunInference prediction is then checked against the direct one
within rel 1e-6, abs 1e-6. Batches of the same sizes as the direct ones give
bit-identical predictions; in batches of other sizes (adaptive sizing) the same
example was seen up to 1.5e-6 apart (a few ulps of the larger sums inside the
model), so an example or two in 100k can miss that tolerance there.

    python bench/inference_bench.py [--data_dir output] [--examples 100000] [--batch_size 1024]

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
    in this process (the FnApiRunner runs the pipeline here). Plain tuples of
    atomic values, which the garbage collector stops tracking: keeping 100k
    PredictionResults alive would add full collections to the timing."""

    outputs: dict[str, list] = {}

    def __init__(self, name: str):
        self.name = name
        Collect.outputs[name] = []

    def __call__(self, element) -> None:
        key, output = element
        Collect.outputs[self.name].append((key, getattr(output, "inference", None), getattr(output, "model_id", None)))


def read_pickled(path: str):
    with open(path, "rb") as f:
        yield from pickle.load(f)


def run_pipeline(name: str, source, transform) -> tuple[dict, list, object]:
    """source: the keyed examples (beam.Create) or the path of a pickle file holding them."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    gc.collect()
    started = time.monotonic()
    pipeline = beam.Pipeline(runner=FnApiRunner())
    if isinstance(source, list):
        keyed = pipeline | "Create" >> beam.Create(source)
    else:
        keyed = pipeline | "Paths" >> beam.Create([source]) | "Read" >> beam.FlatMap(read_pickled)
    _ = keyed | name >> transform | "Collect" >> beam.Map(Collect(name))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT / "output"))
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=1024, help="the handler's max_batch_size (default 1024)")
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    ensure_batch_output(data_dir)
    ensure_model(data_dir)

    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

    from models.features import training_spec
    from models.inference import SavedModelHandler, load_checked_model

    spec = training_spec(data_dir)
    model_path = str(data_dir / "model")
    examples = read_examples(data_dir, args.examples)
    keyed = [(f"example-{i:07d}", example) for i, example in enumerate(examples)]
    load_avg = os.getloadavg()[0]
    print(f"{len(examples):,} examples, batch size {args.batch_size}, load average {load_avg:.2f} "
          f"on {os.cpu_count()} CPUs", flush=True)

    model = load_checked_model(model_path, spec)
    references = []  # direct runs, one before each pipeline and one at the end: the machine's load drifts

    def reference() -> list[float]:
        gc.collect()
        timing, predictions = direct(model, examples, args.batch_size)
        references.append(timing)
        return predictions

    print("serving_default called directly ...", flush=True)
    expected = {key: value for (key, _), value in zip(keyed, reference())}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        pickled = str(Path(tmp) / "examples.pickle")
        with open(pickled, "wb") as f:
            pickle.dump(keyed, f)
        for source_name, source in (("file", pickled), ("Create", keyed)):
            for label, min_batch in ((None, None), ("adaptive", 1), ("fixed", args.batch_size)):
                name = f"{source_name}, " + (f"RunInference, {label} batches" if label else "identity Map")
                print(f"{name} ...", flush=True)
                if runs:
                    reference()
                if label is None:
                    runs[name], _, _ = run_pipeline("Identity", source, beam.Map(lambda element: element))
                    continue
                handler = KeyedModelHandler(SavedModelHandler(model_path, spec, min_batch_size=min_batch,
                                                              max_batch_size=args.batch_size))
                timing, outputs, result = run_pipeline("RunInference", source, RunInference(handler))
                runs[name] = {**timing, **inference_metrics(result), "min_batch_size": min_batch,
                              "check": check(outputs, expected, model.version)}
    reference()
    speeds = sorted(r["examples_per_s"] for r in references)
    median = statistics.median(speeds)
    for run in runs.values():
        run["ratio"] = round(run["examples_per_s"] / median, 2)

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    def row(name: str, r: dict) -> str:
        if "check" not in r:
            return f"| {name} | {r['examples_per_s']:,} | {r['ratio']:.2f} | | | {r['seconds']} s | | |"
        return (f"| {name} (min_batch_size={r['min_batch_size']}) | {r['examples_per_s']:,} | {r['ratio']:.2f} "
                f"| >= {TARGET_RATIO}: {verdict(r['ratio'] >= TARGET_RATIO)} | {r['mean_batch_size']:,} "
                f"({r['batches']} batches) | {r['seconds']} s | {r['model_load_s']} s | {r['in_run_inference_s']} s |")

    def described(c: dict) -> str:
        text = f"{verdict(c['ok'])} ({c['outputs']:,} outputs, {c['mismatches']} mismatches, " \
               f"{c['bit_identical']:,} bit-identical"
        if c["bit_identical"] < c["outputs"]:
            w = c["worst"]
            text += f"; farthest apart: {w['key']}, direct {w['direct']!r}, RunInference {w['run_inference']!r}"
        return text + ")"

    rows = "\n".join(row(name, r) for name, r in runs.items())
    checks = "\n".join(f"- {name}: {described(r['check'])}" for name, r in runs.items() if "check" in r)
    print(f"""
{len(examples):,} examples, max_batch_size {args.batch_size}; pipelines on the FnApiRunner in this process, \
one worker; load average {load_avg:.2f} on {os.cpu_count()} CPUs at start

| examples/s of | examples/s | ratio to direct | target | mean batch size | wall | model load | in run_inference |
|---|---|---|---|---|---|---|---|
| serving_default called directly: median of {len(speeds)} runs between the pipelines (slowest, fastest) \
| {median:,.0f} ({speeds[0]:,}, {speeds[-1]:,}) | 1.00 | reference | {args.batch_size} \
| {len(examples) / median:.2f} s | | |
{rows}

RunInference predictions equal to the direct ones (rel {REL}, abs {ABS}) for every example:
{checks}
""")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    results = {"examples": len(examples), "batch_size": args.batch_size, "load_average": load_avg,
               "cpus": os.cpu_count(), "model_version": model.version,
               "direct": {"median_examples_per_s": median, "runs": references},
               "pipelines": runs}
    (out / "inference_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out / 'inference_bench.json'}")


if __name__ == "__main__":
    main()

"""Warm start against training from scratch, on the full flights data.

One batch job run (time split: train Jan..Oct, eval November, test December)
is reused, its training examples selected by the month of their request (the
`month` column of each example: the flight's local scheduled month) into
data dirs of their own, with the same eval and test files:

    v1  from scratch on Jan..Sep
    v2  v1 warm-started on October only   (python -m models.train --warm_start_from, its defaults)
    v3  from scratch on Jan..Oct           (the batch job's output itself)

and, to choose the warm start's defaults, more warm starts of v1 on October
with other learning rates and epochs (--sweep; each into a model dir of its
own). Every run is the real CLI in a subprocess, without the baseline model.
Prints eval (November) and test (December) MAE, wall times and the ratios,
and writes bench/results/warm_start_bench.json.

    python bench/warm_start_bench.py [--work output/warm_start_bench] [--sweep 0.002:8,0.001:4]

The batch job runs first (about 170 s) unless --work/batch holds its output
for the current spec. The data dirs have no stats.json (the batch job's
statistics describe Jan..Oct, not their months): their versions are
exported without training statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SWEEP = "0.002:8,0.002:4,0.001:4,0.0002:4,0.0005:8"  # learning rate:epochs, beside the defaults (v2)


def ensure_batch_output(batch_dir: Path, fingerprint: str) -> None:
    summary = batch_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text())["spec"]["fingerprint"] == fingerprint:
        print(f"reusing the batch job's output in {batch_dir}", flush=True)
        return
    print(f"running the batch job into {batch_dir} (about 170 s) ...", flush=True)
    subprocess.run([sys.executable, "-m", "beam_app.batch", "--runner", "DirectRunner", "--output", str(batch_dir),
                    "--eval_start", "2013-11-01", "--test_start", "2013-12-01"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def select_months(batch_dir: Path, data_dir: Path, months: set[int], shards: int = 2) -> int:
    """A data dir whose train split holds the batch output's training examples
    of these months (their bytes unchanged), with the batch output's eval and
    test; returns its number of training examples."""
    import numpy as np
    import tensorflow as tf

    from models.data import split_files

    if data_dir.exists():
        shutil.rmtree(data_dir)
    (data_dir / "train").mkdir(parents=True)
    for split in ("eval", "test"):
        (data_dir / split).symlink_to((batch_dir / split).resolve(), target_is_directory=True)
    shutil.copy(batch_dir / "spec.json", data_dir / "spec.json")
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    writers = [tf.io.TFRecordWriter(str(data_dir / "train" / f"examples-{i:05d}-of-{shards:05d}.tfrecord.gz"),
                                    options) for i in range(shards)]
    month = {"month": tf.io.FixedLenFeature([], tf.int64)}
    kept = 0
    records = tf.data.TFRecordDataset(split_files(str(batch_dir), "train"), compression_type="GZIP").batch(8192)
    for index, serialized in enumerate(records):
        chosen = np.isin(tf.io.parse_example(serialized, month)["month"].numpy(), sorted(months))
        for record in serialized.numpy()[chosen]:
            writers[index % shards].write(record)  # runs of 8192 records per shard, in time order as written
        kept += int(chosen.sum())
    for writer in writers:
        writer.close()
    examples = json.loads((batch_dir / "summary.json").read_text())["examples"]
    (data_dir / "summary.json").write_text(json.dumps(
        {"examples": {"train": kept, "eval": examples["eval"], "test": examples["test"]},
         "selected_from": str(batch_dir), "train_months": sorted(months)}, indent=2) + "\n")
    return kept


def train(data_dir: Path, model_dir: Path, *flags: str) -> dict:
    """One run of the training CLI: its wall time and the metrics of the version it wrote."""
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "models.train", "--data_dir", str(data_dir),
                                "--model_dir", str(model_dir), "--no_baseline_model", *flags],
                               cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    if completed.returncode:
        sys.exit(f"models.train {' '.join(flags)} failed:\n{completed.stderr[-3000:]}")
    version = (model_dir / "LATEST").read_text().strip()
    metrics = json.loads((model_dir / version / "metrics.json").read_text())
    params = json.loads((model_dir / version / "params.json").read_text())
    return {"wall_s": round(wall, 1), "train_s": metrics["train_seconds"], "epochs_run": metrics["epochs_run"],
            "examples": metrics["examples"]["train"], "learning_rate": params["learning_rate"],
            "epochs": params["epochs"], "eval_mae": metrics["model"]["eval"]["mae"],
            "test_mae": metrics["model"]["test"]["mae"], "version_dir": str(model_dir / version),
            "before": metrics.get("before_warm_start")}


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no GPU/CPU-feature chatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "output" / "warm_start_bench"),
                        help="Where the batch output, data dirs and models go (default: output/warm_start_bench).")
    parser.add_argument("--sweep", default=DEFAULT_SWEEP,
                        help="More warm starts of v1 on October, as learning_rate:epochs pairs (empty: none; "
                        "default: %(default)s).")
    args = parser.parse_args()
    from transforms.spec import load_spec

    work = Path(args.work)
    batch_dir = work / "batch"
    ensure_batch_output(batch_dir, load_spec("flights").fingerprint)
    jan_sep, october = work / "jan_sep", work / "october"
    sizes = {"jan_sep": select_months(batch_dir, jan_sep, set(range(1, 10))),
             "october": select_months(batch_dir, october, {10})}
    print(f"train examples: Jan..Sep {sizes['jan_sep']:,}, October {sizes['october']:,}", flush=True)
    for models in ("models", "scratch_jan_oct", "sweep"):
        shutil.rmtree(work / models, ignore_errors=True)

    runs = {}
    print("v1: from scratch on Jan..Sep ...", flush=True)
    runs["v1 scratch Jan..Sep"] = train(jan_sep, work / "models")
    v1_dir = runs["v1 scratch Jan..Sep"]["version_dir"]
    print("v2: v1 warm-started on October (the defaults) ...", flush=True)
    runs["v2 warm v1 + Oct"] = train(october, work / "models", "--warm_start_from", str(work / "models"))
    print("v3: from scratch on Jan..Oct ...", flush=True)
    runs["v3 scratch Jan..Oct"] = train(batch_dir, work / "scratch_jan_oct")
    for pair in filter(None, args.sweep.split(",")):
        rate, epochs = pair.split(":")
        print(f"warm start of v1 on October at learning rate {rate}, {epochs} epochs ...", flush=True)
        runs[f"warm v1 + Oct lr {rate} x{epochs}"] = train(
            october, work / "sweep" / pair.replace(":", "x"), "--warm_start_from", v1_dir,
            "--learning_rate", rate, "--epochs", epochs)

    v2, v3 = runs["v2 warm v1 + Oct"], runs["v3 scratch Jan..Oct"]
    lines = [f"{'run':32} {'train ex':>9} {'lr':>7} {'epochs':>6} {'wall s':>7} {'train s':>7} "
             f"{'eval MAE':>9} {'test MAE':>9}"]
    for name, run in runs.items():
        lines.append(f"{name:32} {run['examples']:9,} {run['learning_rate']:7g} "
                     f"{run['epochs_run']:>3}/{run['epochs']:<2} {run['wall_s']:7.1f} {run['train_s']:7.1f} "
                     f"{run['eval_mae']:9.3f} {run['test_mae']:9.3f}")
    before = v2["before"]
    lines.append(f"v1 on the same eval/test, as v2 measured it before training: eval {before['eval']['mae']:.3f}, "
                 f"test {before['test']['mae']:.3f}")
    ratios = {"wall v2/v3": v2["wall_s"] / v3["wall_s"], "train_s v2/v3": v2["train_s"] / v3["train_s"],
              "eval MAE v2/v3": v2["eval_mae"] / v3["eval_mae"], "test MAE v2/v3": v2["test_mae"] / v3["test_mae"],
              "eval MAE v2/v1": v2["eval_mae"] / runs["v1 scratch Jan..Sep"]["eval_mae"],
              "test MAE v2/v1": v2["test_mae"] / runs["v1 scratch Jan..Sep"]["test_mae"]}
    lines.append("ratios: " + ", ".join(f"{name} {value:.3f}" for name, value in ratios.items()))
    warm = {name: run for name, run in runs.items() if "warm" in name}
    best = min(warm, key=lambda name: warm[name]["eval_mae"])
    lines.append(f"best warm start on eval: {best} (eval {warm[best]['eval_mae']:.3f}, "
                 f"test {warm[best]['test_mae']:.3f})")
    print("\n".join(lines), flush=True)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "warm_start_bench.json").write_text(json.dumps(
        {"sizes": sizes, "runs": runs, "ratios": ratios, "best_warm_on_eval": best}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Batch scoring against the batch job on the full flights data (336,776 flights), in one session.

Runs, one after the other on the same machine and input (the embedded data):
1. the batch job (`python -m beam_app.batch --runner DirectRunner --no_stats`): features and
   training examples, no inference: the reference;
2. batch scoring (`python -m beam_app.predict --runner DirectRunner`): the same features, the
   encoder without the label, RunInference with the SavedModel, NDJSON predictions.
Prints each one's wall time, its rate (examples, predictions per second), and scoring's time
over the batch job's: what inference and the prediction rows add to the features.

    python bench/predict_bench.py --model output/model      # the model `make run` trained
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], summary: Path) -> tuple[float, dict]:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", *argv], check=True, cwd=ROOT,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return time.monotonic() - started, json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "output" / "model"),
                        help="The model to score with (default: output/model, what `make run` trained).")
    parser.add_argument("--output", default=None, help="Where the outputs go (default: a temporary directory).")
    args = parser.parse_args(argv)
    work = Path(args.output or tempfile.mkdtemp(prefix="predict_bench_"))
    load = os.getloadavg()[0]

    batch_s, batch = _run(["beam_app.batch", "--runner", "DirectRunner", "--no_stats",
                           "--output", str(work / "batch")], work / "batch" / "summary.json")
    predict_s, scored = _run(["beam_app.predict", "--runner", "DirectRunner", "--model", args.model,
                              "--output", str(work / "predict")], work / "predict" / "summary.json")
    examples = sum(batch["examples"].values())
    results = {
        "load_before": round(load, 1),
        "batch_job": {"seconds": round(batch_s, 1), "feature_rows": batch["feature_rows"],
                      "examples": examples, "examples_per_s": round(examples / batch_s, 1)},
        "predict": {"seconds": round(predict_s, 1), "predictions": scored["predictions"],
                    "predictions_per_s": round(scored["predictions"] / predict_s, 1),
                    "model_version": scored["model_version"]},
        "predict_over_batch": round(predict_s / batch_s, 2),
        "same_requests": scored["predictions"] == batch["feature_rows"],
    }
    print(f"batch job (no inference)  {batch_s:7.1f} s  {examples:,} examples ({examples / batch_s:,.0f}/s)\n"
          f"batch scoring             {predict_s:7.1f} s  {scored['predictions']:,} predictions "
          f"({scored['predictions'] / predict_s:,.0f}/s), model {scored['model_version']}\n"
          f"scoring / batch job       {predict_s / batch_s:7.2f}x  (load {load:.1f} before; every request scored: "
          f"{'yes' if results['same_requests'] else 'NO'}: {scored['predictions']:,} predictions, "
          f"{batch['feature_rows']:,} feature rows)", flush=True)
    out = ROOT / "bench" / "results" / "predict_latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

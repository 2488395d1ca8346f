"""Model benchmark on the full flights data, in one session:

1. default training (`python -m models.train`): wall time and the MAE/RMSE
   table against the baselines (median of train; the same model without the
   windowed features);
2. training input throughput: the same model fed from the TFRecord pipeline
   and from in-memory arrays of the same examples, and their ratio;
3. the exported `serving_default` signature on batches of 1,000 serialized
   tf.Examples, in examples/s.

    python bench/model_bench.py [--data_dir output]   # runs the batch job first if data_dir has no examples
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_TEST_MAE, TARGET_TRAIN_S, TARGET_INPUT_RATIO = 19.0, 600.0, 0.8


def ensure_batch_output(data_dir: Path) -> None:
    if (data_dir / "summary.json").exists():
        return
    print(f"no batch output in {data_dir}: running the batch job first ...", flush=True)
    subprocess.run([sys.executable, "-m", "beam_app.batch", "--runner", "DirectRunner", "--output", str(data_dir)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_training(data_dir: Path, model_dir: Path) -> dict:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "models.train", "--data_dir", str(data_dir), "--model_dir", str(model_dir)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    version_dir = model_dir / (model_dir / "LATEST").read_text().strip()
    metrics = json.loads((version_dir / "metrics.json").read_text())
    return {"seconds": round(seconds, 1), "metrics": metrics, "saved_model": str(version_dir / "saved_model")}


def input_throughput(data_dir: Path, steps: int = 200, batch_size: int = 1024, shuffle_buffer: int = 10_000) -> dict:
    """The same model trained for the same steps, fed by the TFRecord pipeline
    or by Keras from numpy arrays of the same examples already in memory."""
    import keras
    import tensorflow as tf

    from models.data import example_dataset
    from models.features import model_inputs, training_spec
    from models.model import build_model, sample_features

    spec = training_spec(data_dir)
    inputs = model_inputs(spec)
    records = example_dataset(str(data_dir), "train", spec, batch_size, shuffle=True, shuffle_buffer=shuffle_buffer,
                              seed=1, repeat=True, features=inputs.names)
    arrays, targets = sample_features(records, steps * batch_size, with_labels=True)
    tensors = {name: tf.constant(values) for name, values in arrays.items()}  # Keras slices these in memory

    def model():
        keras.utils.set_random_seed(1)
        built = build_model(inputs, spec, arrays)
        built.compile(optimizer="adam", loss="mae")
        return built

    timings = {}
    from_arrays = model()
    from_arrays.fit(tensors, targets, batch_size=batch_size, epochs=1, verbose=0)  # warm up: tracing
    started = time.monotonic()
    from_arrays.fit(tensors, targets, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
    timings["arrays"] = time.monotonic() - started
    from_records = model()
    from_records.fit(records, steps_per_epoch=steps, epochs=1, verbose=0)  # warm up: tracing, buffers
    started = time.monotonic()
    from_records.fit(records, steps_per_epoch=steps, epochs=1, verbose=0)
    timings["records"] = time.monotonic() - started
    examples = steps * batch_size
    return {"tfrecords_per_s": round(examples / timings["records"]), "arrays_per_s": round(examples / timings["arrays"]),
            "ratio": round(timings["arrays"] / timings["records"], 2)}


def serving_throughput(data_dir: Path, saved_model: str, batch: int = 1000, batches: int = 30) -> dict:
    import tensorflow as tf

    from models.data import split_files

    records = [r.numpy() for r in tf.data.TFRecordDataset(split_files(str(data_dir), "test"),
                                                          compression_type="GZIP").take(batch * batches)]
    serve = tf.saved_model.load(saved_model).signatures["serving_default"]
    chunks = [tf.constant(records[i:i + batch]) for i in range(0, len(records), batch)]
    serve(examples=chunks[0])  # warm up
    started = time.monotonic()
    for chunk in chunks:
        serve(examples=chunk)
    return {"examples_per_s": round(len(records) / (time.monotonic() - started)), "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT / "output"))
    data_dir = Path(parser.parse_args().data_dir).resolve()
    ensure_batch_output(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        print("1/3 default training on the full flights data ...", flush=True)
        training = run_training(data_dir, Path(tmp) / "model")
        print("2/3 training input throughput: TFRecords vs in-memory arrays ...", flush=True)
        inputs = input_throughput(data_dir)
        print("3/3 serving signature throughput ...", flush=True)
        serving = serving_throughput(data_dir, training["saved_model"])
    m = training["metrics"]

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    rows = [("median of train", m["median_of_train"]),
            ("model without windowed features", m["without_windowed_features"]),
            ("model (static + windowed features)", m["model"])]
    table = "\n".join(f"| {name} | {v['eval']['mae']:.2f} | {v['eval']['rmse']:.2f} | {v['test']['mae']:.2f} "
                      f"| {v['test']['rmse']:.2f} |" for name, v in rows)
    test_mae = m["model"]["test"]["mae"]
    print(f"""
| model | eval MAE | eval RMSE | test MAE | test RMSE |
|---|---|---|---|---|
{table}

| figure | value | target |
|---|---|---|
| test MAE (December) | {test_mae:.2f} min | <= {TARGET_TEST_MAE}: {verdict(test_mae <= TARGET_TEST_MAE)} (GBT reference 18.74) |
| windowed features' gain, test MAE | {m['windowed_features_gain_mae']['test']:.2f} min | |
| default training, both models, wall | {training['seconds']} s ({m['epochs_run']} epochs) | < {TARGET_TRAIN_S:.0f} s: {verdict(training['seconds'] < TARGET_TRAIN_S)} |
| training input, TFRecords | {inputs['tfrecords_per_s']:,} examples/s | |
| training input, in-memory arrays | {inputs['arrays_per_s']:,} examples/s | |
| TFRecords / arrays | {inputs['ratio']:.2f} | >= {TARGET_INPUT_RATIO}: {verdict(inputs['ratio'] >= TARGET_INPUT_RATIO)} |
| serving_default, batches of {serving['batch']:,} | {serving['examples_per_s']:,} examples/s | |
""")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    results = {"training": training, "input": inputs, "serving": serving}
    (out / "model_latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out / 'model_latest.json'}")


if __name__ == "__main__":
    main()

"""The flights MAE table: median of train, the model without windowed features,
the model on the first five windowed features only, and the model on every
feature of the spec, from the metrics.json that `models.train` wrote, with
the test MAE measured again through the exported SavedModel.

    python -m models.train --data_dir DATA --model_dir MODEL           # every feature (and the baseline)
    python -m models.train --data_dir DATA_V1 --model_dir MODEL_V1 --no_baseline_model
    python bench/model_table.py --model MODEL --five_features MODEL_V1 [--data_dir DATA]

DATA_V1: the batch job on a copy of transforms/specs/flights.yaml with only
its first five windowed features. --model and --five_features take a
version directory or a model directory (its LATEST version). With
--data_dir, the new model's exported serving_default signature is run on
the serialized test examples and its MAE printed beside the one train reported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPLITS = ("eval", "test")


def version_dir(path: str) -> Path:
    """A version directory, or the LATEST one of a model directory."""
    path = Path(path)
    if (path / "LATEST").exists():
        return path / (path / "LATEST").read_text().strip()
    if not (path / "metrics.json").exists():
        sys.exit(f"error: {path} has neither metrics.json nor LATEST")
    return path


def metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def served_test_metrics(version: Path, data_dir: str) -> dict[str, float]:
    """MAE and RMSE of the exported serving_default signature on the test split's serialized examples."""
    import numpy as np
    import tensorflow as tf

    from models.data import split_files
    from transforms.examples import parse_feature_spec
    from transforms.spec import load_spec

    spec = load_spec(Path(data_dir) / "spec.json")
    label = {spec.label.name: parse_feature_spec(spec)[spec.label.name]}
    serve = tf.saved_model.load(str(version / "saved_model")).signatures["serving_default"]
    absolute = squared = count = 0.0
    for records in tf.data.TFRecordDataset(split_files(data_dir, "test"), compression_type="GZIP").batch(4096):
        errors = (serve(examples=records)["prediction"].numpy().astype("float64")
                  - tf.io.parse_example(records, label)[spec.label.name].numpy())
        absolute += float(np.abs(errors).sum())
        squared += float(np.square(errors).sum())
        count += len(errors)
    return {"mae": absolute / count, "rmse": math.sqrt(squared / count)}


def table(new: dict, five: dict | None) -> list[tuple[str, dict]]:
    rows = [("median of train", new["median_of_train"])]
    if "without_windowed_features" in new:
        rows.append(("model without windowed features", new["without_windowed_features"]))
    if five is not None:
        rows.append(("model, five windowed features", five["model"]))
    rows.append(("model, every windowed feature", new["model"]))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="The model trained on every feature (version or model dir).")
    parser.add_argument("--five_features", help="The same model code trained on the five-feature data.")
    parser.add_argument("--data_dir", help="The new model's data: re-measure its test MAE through the SavedModel.")
    args = parser.parse_args(argv)

    new_dir = version_dir(args.model)
    new = metrics(new_dir)
    five = metrics(version_dir(args.five_features)) if args.five_features else None
    print(f"| {'':34} | eval MAE | eval RMSE | test MAE | test RMSE |")
    print(f"|{'-' * 36}|---------:|----------:|---------:|----------:|")
    for name, values in table(new, five):
        print(f"| {name:34} | {values['eval']['mae']:8.2f} | {values['eval']['rmse']:9.2f} "
              f"| {values['test']['mae']:8.2f} | {values['test']['rmse']:9.2f} |")
    print(f"\nmodel: {new_dir} ({new.get('epochs_run')} epochs, train_seconds {new.get('train_seconds')})")
    if args.data_dir:
        served = served_test_metrics(new_dir, args.data_dir)
        print(f"test through the exported serving_default: MAE {served['mae']:.4f} RMSE {served['rmse']:.4f} "
              f"(train reported MAE {new['model']['test']['mae']:.4f} RMSE {new['model']['test']['rmse']:.4f})")


if __name__ == "__main__":
    main()

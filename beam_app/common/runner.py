"""What differs when a job runs on this machine rather than on Dataflow."""

from __future__ import annotations

import os
from typing import Sequence

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

LOCAL_RUNNERS = (None, "DirectRunner", "direct", "BundleBasedDirectRunner")


def is_local_runner(options: PipelineOptions) -> bool:
    """The DirectRunner family (the default when --runner is not given)."""
    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS


def use_all_cores_locally(options: PipelineOptions, argv: Sequence[str]) -> None:
    """On the DirectRunner, default to one worker process per core (about 1.7x
    faster on 2 cores than the single in-process worker); flags still win.
    Read from argv: Beam's options cannot tell an explicit default from none."""
    runner = options.view_as(StandardOptions).runner
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--direct_")}
    if runner in (None, "DirectRunner", "direct") and "--direct_num_workers" not in given:
        direct = options.view_as(DirectOptions)
        direct.direct_num_workers = os.cpu_count() or 1
        if "--direct_running_mode" not in given:
            direct.direct_running_mode = "multi_processing"

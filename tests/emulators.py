"""Session-wide emulator fixtures (beam_app.local_stack): each emulator starts
once, on free ports, for every test that asks for it, and stops at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from beam_app.local_stack import BigQueryEmulator, PubSubEmulator

PROJECT = "test-project"


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[PubSubEmulator]:
    """The Pub/Sub emulator, with PUBSUB_EMULATOR_HOST (and NO_GCE_CHECK) set for the session."""
    with PubSubEmulator() as emulator:
        previous = {name: os.environ.get(name) for name in emulator.env}
        os.environ.update(emulator.env)
        try:
            yield emulator
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="session")
def bigquery_emulator() -> Iterator[BigQueryEmulator]:
    """local-bigquery serving project "test-project"; clients reach it through its `.endpoint`."""
    with BigQueryEmulator(PROJECT) as emulator:
        yield emulator

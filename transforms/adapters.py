"""CSV adapters: a raw CSV row of a known data set -> the events it holds.

A spec names each source's adapter by reference, `sources.<name>.csv_adapter:
package.module:function`, which the entry point resolves when a job starts
(`beam_app.adapters.load_adapters`) and hands to the parser: the engine
knows no data set (the shipped ones are in beam_app/adapters/). An adapter knows a
source's layout (column names, how times are written, which rows carry which
role); it does not check types or ranges: every event goes through
`parse.EventValidator` against the spec afterwards, the same check NDJSON and
Pub/Sub events get. It raises `InvalidRecord` for what it cannot read, and
gives None for empty values, which the spec then allows or rejects.

The helpers below read one column in the way every adapter needs.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

from transforms.events import Event, InvalidRecord

CsvAdapter = Callable[[Mapping[str, str]], list[Event]]

_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MISSING = ("", "NA")


def is_reference(text: str) -> bool:
    """'package.module:function'"""
    return bool(_REFERENCE.match(text))


def is_missing(value: Optional[str]) -> bool:
    return value is None or value.strip() in MISSING


def column(row: Mapping[str, str], name: str) -> str:
    """A value that must be there."""
    value = row.get(name)
    if is_missing(value):
        raise InvalidRecord(f"{name}: missing")
    return value.strip()


def integer(row: Mapping[str, str], name: str) -> int:
    text = column(row, name)
    try:
        return int(text)
    except ValueError:
        raise InvalidRecord(f"{name}: not an integer: {text!r}") from None


def number_or_none(row: Mapping[str, str], name: str) -> Optional[float]:
    if is_missing(row.get(name)):
        return None
    text = row[name].strip()
    try:
        return float(text)
    except ValueError:
        raise InvalidRecord(f"{name}: not a number: {text!r}") from None

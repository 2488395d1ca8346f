"""A Dockerfile read as Docker reads it, for the tests of the two images (the flex template's and
the online service's): comment lines dropped, continuation lines joined."""

from __future__ import annotations

from pathlib import Path


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, the arguments' whitespace collapsed; variables left as written."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(instruction.upper(), " ".join(rest.split())) for instruction, _, rest in
            (line.strip().partition(" ") for line in logical)]

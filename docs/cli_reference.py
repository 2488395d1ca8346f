"""Writes docs/cli.md, the reference of every command's flags, from the
commands' own parsers (each command's --help, captured in this process).

    python docs/cli_reference.py > docs/cli.md

tests/test_commands.py fails when docs/cli.md and the parsers differ."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
WIDTH = "100"  # argparse wraps --help to $COLUMNS: fixed, so the file does not depend on the terminal


class Command(NamedTuple):
    invocation: str  # how a user runs it
    module: str  # a module name, or a path relative to the repository root
    entry: str  # the function --help goes through


COMMANDS = (
    Command("python -m beam_app.batch", "beam_app.batch", "main"),
    Command("python -m models.train", "models.train", "main"),
    Command("python -m beam_app.streaming", "beam_app.streaming", "main"),
    Command("python -m beam_app.publish", "beam_app.publish", "main"),
    Command("python -m beam_app.predict", "beam_app.predict", "main"),
    Command("python -m beam_app.consistency", "beam_app.consistency", "main"),
    Command("python -m beam_app.drift", "beam_app.drift", "main"),
    Command("python -m beam_app.serve", "beam_app.serve", "main"),
    Command("python -m beam_app.local.demo", "beam_app.local.demo", "run"),
    Command("python -m beam_app.local.loop", "beam_app.local.loop", "main"),
    Command("python -m beam_app.local.online", "beam_app.local.online", "run"),
    Command("python -m beam_app.local.stack", "beam_app.local.stack", "main"),
    Command("python templates/deploy.py", "templates/deploy.py", "main"),
)


def load(command: Command):
    """The command's module (a file path is loaded as the script it is)."""
    if command.module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(command.module).stem, ROOT / command.module)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(command.module)


def invoke(command: Command, args: list[str]) -> tuple[int, str, str]:
    """Runs the command's entry point in this process with `args` as its command line:
    (exit status, stdout, stderr). Only for arguments that stop before any work: --help, bad flags."""
    from transforms import command_line

    entry = getattr(load(command), command.entry)
    out, err = io.StringIO(), io.StringIO()
    # The stderr filter of quiet_tensorflow() would outlive this call: the command runs without it.
    saved_filter, command_line._filter = command_line._filter, (-1, None)
    saved_argv, saved_environ = sys.argv, dict(os.environ)  # a command's main may set TF_CPP_MIN_LOG_LEVEL
    sys.argv = [command.invocation, *args]
    os.environ["COLUMNS"] = WIDTH
    status = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            err.write(exit_.code)
    finally:
        command_line._filter = saved_filter
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_environ)
    return status, out.getvalue(), err.getvalue()


def help_text(command: Command) -> str:
    status, out, err = invoke(command, ["--help"])
    if status != 0 or not out.strip():
        raise RuntimeError(f"{command.invocation} --help: exit {status}, stderr {err.strip()[-500:]!r}")
    return "\n".join(line.rstrip() for line in out.strip().splitlines())


def reference() -> str:
    sections = [
        "# Command-line reference",
        "",
        "Every command's `--help`, generated from its parser by `python docs/cli_reference.py > docs/cli.md` "
        "(a test fails when this file and the parsers differ). Every command refuses an unknown flag and names "
        "the closest known one; exit status 0 is done, 1 a failed check, 2 a usage error. The Beam commands "
        "(batch, streaming, predict, consistency) also take any Apache Beam pipeline option.",
        "",
        *(f"- [`{c.invocation}`](#{c.invocation.replace(' ', '-').replace('.', '').replace('/', '')})"
          for c in COMMANDS),
    ]
    for command in COMMANDS:
        sections += ["", f"## {command.invocation}", "", "```text", help_text(command), "```"]
    return "\n".join(sections) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stdout.write(reference())

"""Options shared by every command, and the parsing every command shares:
an unknown flag is refused (exit 2) naming the closest known one, never
dropped as Beam's own parser would drop it."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence, TypeVar

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from beam_app.common.errors import EXIT_STATUS_HELP, UsageError
from transforms.command_line import ArgumentParser, quiet_tensorflow, unknown_flag_message  # noqa: F401 - commands import them here
from transforms.spec import shipped_specs


class CommonOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--spec", default="flights",
            help=f"Feature spec: a shipped spec name ({', '.join(shipped_specs())}; default flights) "
                 "or a path to a spec YAML/JSON file.")


def configure_logging(verbose: bool = False) -> None:
    """Our progress at INFO; Beam's own chatter only when it matters."""
    # force: importing TensorFlow/Beam may already have configured the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    if not verbose:
        for noisy in ("apache_beam", "absl", "tensorflow"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        for chatter in (
            # The DirectRunner first tries to fetch the Prism runner; offline that
            # fails harmlessly and it falls back, with a traceback we do not need.
            "apache_beam.runners.direct.direct_runner",
            # Option-parsing notes about flags meant for other option classes.
            "apache_beam.options.pipeline_options",
            # Worker processes' own start-up warnings, relayed as raw protos.
            "apache_beam.runners.portability.local_job_service",
        ):
            logging.getLogger(chatter).setLevel(logging.ERROR)


BEAM_FLAGS_HELP = ("Any Apache Beam pipeline option is accepted too: --runner (DirectRunner here, DataflowRunner "
                   "with --project/--region/--temp_location/--setup_file ./setup.py), --direct_num_workers, ...")

Options = TypeVar("Options", bound=PipelineOptions)


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found


def _beam_parser(option_classes: Sequence[type]) -> argparse.ArgumentParser:
    """Every flag Beam's own option classes define, and the command's."""
    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False, conflict_handler="resolve")
    beam_classes = {f"{c.__module__}.{c.__qualname__}": c for c in _all_subclasses(PipelineOptions)
                    if c.__module__.startswith("apache_beam.")}
    for option_class in (*beam_classes.values(), *option_classes):
        option_class._add_argparse_args(parser)
    return parser


def pipeline_options(option_class: type[Options], argv: Sequence[str],
                     extra_classes: Sequence[type] = (CommonOptions,)) -> Options:
    """`option_class` read from `argv`; UsageError for any flag or value that neither it,
    `extra_classes` nor Beam knows (Beam alone would drop it and run with the default)."""
    parser = _beam_parser((*extra_classes, option_class))
    known = [flag for action in parser._actions for flag in action.option_strings]
    _, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise UsageError(unknown_flag_message(unknown, known))
    return option_class(list(argv))


def command_parser(prog: str, description: Optional[str], option_classes: Sequence[type],
                   epilog: str = BEAM_FLAGS_HELP) -> argparse.ArgumentParser:
    """The parser --help and the CLI reference show: the command's own flags
    (Beam's parser would list every Beam option first)."""
    parser = ArgumentParser(prog=prog, description=description, epilog=f"{epilog}\n\n{EXIT_STATUS_HELP}")
    for option_class in option_classes:
        option_class._add_argparse_args(parser)
    return parser


def wants_help(argv: Sequence[str]) -> bool:
    return bool({"-h", "--help"} & set(argv))


def print_help(prog: str, description: Optional[str], option_classes: Sequence[type],
               epilog: str = BEAM_FLAGS_HELP) -> None:
    command_parser(prog, description, option_classes, epilog).print_help(sys.stdout)

"""Entry point of the streaming job's Dataflow flex template.

Dataflow's template launcher runs this file (FLEX_TEMPLATE_PYTHON_PY_FILE in
templates/streaming/Dockerfile: /template/main.py in the image) as
`python main.py --name=value ...`, with the parameters of metadata.json and
Dataflow's own options (--runner DataflowRunner, --project, ...). It starts
beam_app.streaming, which submits the job and returns; the workers run the
same image. Anywhere the package is installed it runs like
`python -m beam_app.streaming`, e.g. on the DirectRunner:

    python templates/streaming/main.py --runner DirectRunner \\
        --input_subscription projects/P/subscriptions/S --model output/model \\
        --predictions_table P:features.predictions --dead_letter_table P:features.dead_letters
"""

from __future__ import annotations

import argparse
import sys

from beam_app import streaming


def _switches() -> set[str]:
    """The job's flags that take no value (--create_tables)."""
    parser = argparse.ArgumentParser(add_help=False)
    streaming.StreamingOptions._add_argparse_args(parser)
    streaming.CommonOptions._add_argparse_args(parser)
    return {flag for action in parser._actions if action.nargs == 0 for flag in action.option_strings}


def template_argv(argv: list[str]) -> list[str]:
    """The launcher passes every parameter as --name=value, a BOOLEAN one as
    --name=true or --name=false, while the job's switches take no value:
    --create_tables=true -> --create_tables, --create_tables=false -> nothing."""
    switches, result = _switches(), []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if equals and flag in switches and value.lower() in ("true", "false"):
            if value.lower() == "true":
                result.append(flag)
            continue
        result.append(arg)
    return result


if __name__ == "__main__":
    sys.argv[1:] = template_argv(sys.argv[1:])
    streaming.main()

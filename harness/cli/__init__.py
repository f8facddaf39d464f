"""Command line: `python -m harness {run,tune,import,list,table,status,report,new-method,check-method,
prepare,generate}`, one module of this package per subcommand (its arguments beside its handler).

Building the parser imports only those light modules; each handler imports what it needs (torch,
transformers, the runner) when it runs, so `harness list` or `--help` starts at once. Any bad input
ends with exit code 2 and one line that names the argument or file and the problem.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from harness.errors import HarnessError

# subcommand -> its module in this package (`add_arguments(sub)`, `handle(args)`), in help order
COMMANDS = {"run": "run", "tune": "tune", "import": "import_results", "list": "listing",
            "table": "table", "status": "status", "report": "report", "new-method": "new_method",
            "check-method": "check_method", "prepare": "prepare", "generate": "generate"}


def _command(name: str):
    return importlib.import_module(f"harness.cli.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    from harness.cli.common import Parser

    parser = Parser(prog="harness", description="Continual-learning benchmark harness")
    # The DeepSpeed launcher passes --local_rank before the subcommand; the rank comes from the
    # environment it sets, so the value itself is not needed.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        _command(name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from harness.runlog import configure_process_logging
    from harness.sweep import without

    configure_process_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = without(argv, ("--local_rank", "--local-rank"))
        code = _command(args.command).handle(args) or 0
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: complete stages are kept; run the same command again to resume",
              file=sys.stderr)
        code = 130
    if "torch.distributed" in sys.modules and _launched():
        # A rank leaves without tearing down the process group: gloo's teardown at interpreter
        # exit aborts a rank whose peer already left ("terminate called without an active
        # exception"), which the launcher would report as a failure of a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _launched() -> bool:
    from harness.distributed import launched  # imports torch: only once a command has

    return launched()

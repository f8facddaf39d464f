"""`harness check-method`: the plugin contract on a registered method."""

from __future__ import annotations

from pathlib import Path

from harness.cli.common import str_list


def add_arguments(sub) -> None:
    check = sub.add_parser("check-method", help="run the plugin contract on a registered method")
    check.add_argument("name", help="a method name (a modifier is checked on top of seqlora)")
    check.add_argument("--skip", type=str_list, default=[],
                       help="checks to leave out, comma-separated (e.g. two_ranks)")
    check.add_argument("--keep", type=Path, help="keep the checks' runs in this folder")


def handle(args) -> int:
    from harness.testing.contract import check_method, runnable_name

    print(f"checking method {runnable_name(args.name)!r} against the plugin contract", flush=True)
    results = check_method(args.name, tuple(args.skip), workdir=args.keep,
                           report=lambda r: print(r.line(), flush=True))
    failed = sum(r.passed is False for r in results)
    print(f"{len(results) - failed} of {len(results)} checks passed or did not apply; "
          f"{failed} failed" if failed else f"all {len(results)} checks passed or did not apply")
    return 1 if failed else 0

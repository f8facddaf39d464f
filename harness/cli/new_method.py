"""`harness new-method`: a method plugin package (method, config, test), or a built-in method."""

from __future__ import annotations

from pathlib import Path


def add_arguments(sub) -> None:
    new = sub.add_parser("new-method", help="write a method plugin package: method, config, test")
    new.add_argument("name")
    new.add_argument("--out", type=Path, help="a new folder for the plugin package (without it: "
                     "a built-in method, only in a development clone of the harness)")


def handle(args) -> None:
    from harness import scaffold

    if args.out is None:
        written = scaffold.new_builtin_method(args.name)
        print(f"no --out: wrote a built-in method into the development clone {scaffold.PROJECT_ROOT}")
        install, tests = scaffold.PROJECT_ROOT, f"tests/test_method_{args.name}.py"
    else:
        written = scaffold.new_plugin_package(args.name, args.out)
        install, tests = args.out, args.out
    for path in written:
        print(f"wrote {path}")
    print(f"next: pip install -e {install} (registers the entry point), then pytest {tests}, "
          f"harness check-method {args.name} and harness run --method {args.name} --order 1")

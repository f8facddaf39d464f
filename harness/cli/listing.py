"""`harness list`: the tasks, orders, methods or profiles."""

from __future__ import annotations

import sys


def add_arguments(sub) -> None:
    lst = sub.add_parser("list", help="print tasks, orders, methods or profiles")
    lst.add_argument("what", choices=["tasks", "orders", "methods", "profiles"])


def handle(args) -> None:
    from tabulate import tabulate

    from harness.benchmark import load_benchmark
    from harness.profiles import available, load_profile
    from harness_methods import registry

    bench = load_benchmark()
    if args.what == "tasks":
        rows = [(t.name, t.category, t.folder, len(t.labels), ", ".join(t.labels))
                for t in bench.tasks.values()]
        print(tabulate(rows, headers=["task", "category", "folder", "#labels", "labels"]))
    elif args.what == "orders":
        print(tabulate([(k, len(v), "; ".join(bench.also_called(k)) or "-", " -> ".join(v))
                        for k, v in bench.orders.items()],
                       headers=["order", "#tasks", "also called", "sequence"]))
    elif args.what == "methods":
        rows = []
        for name, ep in registry.available().items():
            cls = registry.method_class(name)
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            rows.append((name, ep.value, doc[0] if doc else ""))
        print(tabulate(rows, headers=["method", "plugin", "description"]))
    else:
        print(tabulate([(n, load_profile(n).description) for n in available()],
                       headers=["profile", "description"]))

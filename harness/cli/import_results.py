"""`harness import`: another codebase's outputs into the results store."""

from __future__ import annotations

from pathlib import Path


def add_arguments(sub) -> None:
    imp = sub.add_parser("import", help="read another codebase's outputs into the results store")
    imp.add_argument("kind", choices=["olora"], help="olora: O-LoRA, N-LoRA or GORP output folder")
    imp.add_argument("source", type=Path, metavar="DIR", help="folder of <stage>-<task> sub-folders")
    imp.add_argument("--method", required=True, help="method name to file the run under")
    imp.add_argument("--order", type=int, required=True, help="task order 1-6 of the run")
    imp.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    imp.add_argument("--profile", default="default", help="profile (see `list profiles`)")
    imp.add_argument("--results", type=Path, default=Path("results"), help="results root")
    imp.add_argument("--model", help="backbone label, as given to `run --model` (to share its tables)")
    imp.add_argument("--data-dir", type=Path, help="the real data the run used (or $HARNESS_DATA_DIR)")
    imp.add_argument("--force", action="store_true", help="replace a run already in the target folder")


def handle(args) -> None:
    from harness.importer import import_olora

    summary = import_olora(args.source, method=args.method, order=args.order, seed=args.seed,
                           profile=args.profile, results=args.results, force=args.force,
                           model=args.model, data_dir=args.data_dir)
    m = summary.metrics
    print(f"{summary.method:10s} {summary.sequence:12s} seed{summary.seed}  "
          f"AA {_metric(m['AA'])}  BWT {_metric(m.get('BWT'))}  (imported)", flush=True)


def _metric(value: float | None) -> str:
    return "missing" if value is None else f"{value:.2f}"

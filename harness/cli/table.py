"""`harness table`: leaderboards (paper layout, full, against published numbers) and plots."""

from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError


def add_arguments(sub) -> None:
    table = sub.add_parser("table", help="leaderboards (paper layout, full, vs published) and plots")
    table.add_argument("--results", type=Path, default=Path("results"))
    table.add_argument("--profile", help="only this profile")
    table.add_argument("--format", choices=["github", "latex", "csv"], default="github")
    table.add_argument("--layout", choices=["paper", "full", "all"], default="all",
                       help="paper: methods x orders; full: every metric and significance")
    table.add_argument("--reference", help="also test every method against this one, e.g. olora")
    table.add_argument("--compare-published", action="store_true",
                       help="add our AA beside the published numbers in baselines/")
    table.add_argument("--published-backbone", default="t5-large",
                       help="backbone of the published numbers to compare with (default t5-large)")
    table.add_argument("--out", type=Path,
                       help="write every table as .md, .tex and .csv, and the plots, into this folder")


def handle(args) -> None:
    from harness.table import leaderboard

    layouts = ("paper", "full") if args.layout == "all" else (args.layout,)
    layouts += ("compare",) if args.compare_published else ()
    options = dict(profile=args.profile, layouts=layouts, reference=args.reference,
                   backbone=args.published_backbone)
    if not args.out:
        print("\n\n".join(leaderboard(args.results, fmt=args.format, **options).values()))
        return
    from harness.plots import write_all
    from harness.store import write_atomic

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"--out {args.out}: cannot create it ({exc.strerror or exc})") from exc
    for fmt, suffix in (("github", "md"), ("latex", "tex"), ("csv", "csv")):
        for name, text in leaderboard(args.results, fmt=fmt, **options).items():
            write_atomic(args.out / f"{name}.{suffix}", text + "\n")
            if fmt == "github":
                print(text + "\n")
    plots = write_all(args.results, args.out / "plots", profile=args.profile)
    print(f"tables (.md, .tex, .csv) and {len(plots)} plot files written to {args.out}")

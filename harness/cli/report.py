"""`harness report`: one self-contained HTML page of a results folder."""

from __future__ import annotations

from pathlib import Path


def add_arguments(sub) -> None:
    report = sub.add_parser("report", help="one self-contained HTML page: tables, published "
                            "numbers, every plot and each run's provenance")
    report.add_argument("--results", type=Path, default=Path("results"))
    report.add_argument("--out", type=Path, help="folder for index.html (default: RESULTS/report)")
    report.add_argument("--profile", help="only this profile")
    report.add_argument("--reference", help="also test every method against this one, e.g. olora")
    report.add_argument("--published-backbone", default="t5-large",
                        help="backbone of the published numbers to compare with (default t5-large)")


def handle(args) -> None:
    from harness.report import write_report

    page = write_report(args.results, args.out or args.results / "report", profile=args.profile,
                        reference=args.reference, backbone=args.published_backbone)
    print(f"report: {page}")

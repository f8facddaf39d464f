"""Leaderboards from a results tree (reads only `summary.json` files)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError


def load_summaries(results: Path, profile: str | None = None) -> pd.DataFrame:
    rows = []
    root = Path(results)
    if not root.is_dir():
        raise HarnessError(f"--results {root}: no such directory")
    for path in sorted(root.glob("*/*/*/seed*/summary.json")):
        try:
            summary = json.loads(path.read_text())
            if profile and summary["profile"] != profile:
                continue
            rows.append({"profile": summary["profile"], "method": summary["method"],
                         "sequence": summary["sequence"], "seed": summary["seed"],
                         "benchmark": f"{summary['benchmark']['kind']} "
                                      f"({summary['benchmark']['data_dir']})",
                         **summary["metrics"]})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HarnessError(f"{path}: corrupt summary ({type(exc).__name__}: {exc})") from exc
    return pd.DataFrame(rows)


def leaderboard(results: Path, profile: str | None = None, fmt: str = "github") -> str:
    """Method x sequence table of AA (mean over seeds), one block per profile and benchmark."""
    df = load_summaries(results, profile)
    if df.empty:
        raise HarnessError(f"{results}: no complete runs found")
    blocks = []
    for (prof, bench), group in df.groupby(["profile", "benchmark"]):
        pivot = group.pivot_table(index="method", columns="sequence", values="AA", aggfunc="mean")
        pivot["avg"] = pivot.mean(axis=1)
        seeds = group.groupby(["method", "sequence"]).seed.nunique()
        title = (f"AA (%) by method and task sequence; profile {prof}; benchmark {bench}; "
                 f"seeds per cell {seeds.min()}-{seeds.max()}")
        if fmt == "csv":
            blocks.append(f"# {title}\n" + pivot.round(2).to_csv())
        else:
            blocks.append(title + "\n\n" + pivot.round(2).to_markdown(
                tablefmt="latex" if fmt == "latex" else "github"))
    return "\n\n".join(blocks)

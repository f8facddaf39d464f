"""Figures for a paper from a results tree (reads only `summary.json` files).

- `accuracy_heatmap`: one run's accuracy matrix (stages x tasks);
- `forgetting_curves`: each task's accuracy from the stage that learned it to the last stage,
  mean over seeds with a min-max band;
- `aa_with_ci`: AA per method with 95% confidence intervals;
- `write_all`: all of the above for every run of a results tree.

Each writes `<stem>.png` (200 dpi) and `<stem>.pdf`, or the `formats` asked for, and returns the
paths written. Figures are built on
`matplotlib.figure.Figure` with an Agg canvas, never through pyplot: nothing is registered in a
global figure list (so nothing leaks over hundreds of runs) and the caller's backend is untouched.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import warnings
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from harness.errors import HarnessError
from harness.machine import usable_cores
from harness.rows import method_key
from harness.stats import describe
from harness.summary import TUNED, Summary, read_summaries

STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
         "ytick.labelsize": 9, "legend.fontsize": 8,
         "pdf.fonttype": 42, "ps.fonttype": 42}  # TrueType in PDFs: venues reject Type 3 fonts


def _styled(plot):
    """Apply STYLE while a figure is built and saved, leaving the caller's rcParams alone."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(STYLE):
            return plot(*args, **kwargs)
    return wrapper


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


FORMATS = {".png": 200, ".pdf": None}  # file suffix -> dots per inch of a raster format


def _save(fig: Figure, out_stem: Path, formats: dict[str, int | None]) -> list[Path]:
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, dpi in formats.items():
        paths.append(out_stem.with_name(out_stem.name + suffix))
        if dpi is None:
            fig.savefig(paths[-1], bbox_inches="tight", metadata={"CreationDate": None})  # reproducible
        else:
            fig.savefig(paths[-1], dpi=dpi, bbox_inches="tight")
    fig.clear()  # drop the artists now rather than when the figure is collected
    return paths


DARK_TEXT_ABOVE = 60  # a cell's number is black above this value (the light end of the maps)


def matrix_panels(summary: Summary) -> list[tuple[np.ndarray, str, str]]:
    """(matrix, label, colour map) of R, and of O when the run stored predictions."""
    panels = [(summary.matrix(), "accuracy (%)", "viridis")]
    O = np.array(summary.format_matrix, dtype=float) if summary.format_matrix else None
    if O is not None and not np.isnan(O).all():
        panels.append((O, "answers outside the label set (%)", "magma"))
    return panels


def stage_labels(summary: Summary) -> list[str]:
    """The matrices' row names: "base", then "1: <task>", ..."""
    rows = summary.row_labels
    return [rows[0]] + [f"{i}: {name}" for i, name in enumerate(rows[1:], 1)]


@_styled
def accuracy_heatmap(summary: Summary, out_stem: Path, formats: dict[str, int | None] = FORMATS
                     ) -> list[Path]:
    """The accuracy matrix R: rows = stages (base, then each trained stage), columns = tasks;
    missing cells are hatched. Beside it, when the run stored predictions, the format matrix O
    (the share of answers outside each task's label set)."""
    panels = matrix_panels(summary)
    n_rows, n_cols = panels[0][0].shape
    fig = _figure(len(panels) * max(5.0, 2.2 + 0.62 * n_cols), max(3.0, 1.6 + 0.36 * n_rows))
    for index, (M, label, colours) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), index)
        _matrix_panel(fig, ax, M, summary, label, colours, ylabels=index == 1)
    fig.suptitle(f"{summary.label} on {summary.sequence}, seed {summary.seed}; "
                 f"profile {summary.profile}, {summary.benchmark['kind']} benchmark")
    return _save(fig, out_stem, formats)


def _matrix_panel(fig, ax, M: np.ndarray, summary: Summary, label: str, colours: str,
                  ylabels: bool) -> None:
    n_rows, n_cols = M.shape
    cmap = mpl.colormaps[colours].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    small = 7 if n_cols > 10 else 8
    for i, j in np.ndindex(M.shape):
        if math.isnan(M[i, j]):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                   edgecolor="0.7", linewidth=0))
        else:  # dark text on the light (yellow) end of the map, white elsewhere
            ax.text(j, i, f"{M[i, j]:.1f}", ha="center", va="center", fontsize=small,
                    color="black" if M[i, j] > DARK_TEXT_ABOVE else "white")
    ax.set_xticks(range(n_cols), summary.tasks, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n_rows), stage_labels(summary) if ylabels else [""] * n_rows)
    ax.set_xlabel("evaluated task")
    if ylabels:
        ax.set_ylabel("model after stage")
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, label=label, ticks=range(0, 101, 20), shrink=0.9)


@_styled
def forgetting_curves(summaries: list[Summary], out_stem: Path,
                      formats: dict[str, int | None] = FORMATS) -> list[Path]:
    """For one method and sequence: each task's accuracy from the stage that learned it to the
    last stage; the mean over seeds, with a min-max band when there are several."""
    if not summaries:
        raise ValueError("forgetting_curves: no runs given")
    first = summaries[0]
    for s in summaries:
        if (s.label, s.sequence, s.tasks) != (first.label, first.sequence, first.tasks):
            raise ValueError("forgetting_curves: runs must share one method and sequence "
                             f"(got {s.label}/{s.sequence} and {first.label}/{first.sequence})")
        if s.joint:  # trained once on the whole sequence: one trained row
            raise ValueError(f"forgetting_curves: {s.method}/{s.sequence} seed {s.seed} is a joint "
                             f"run (rows {s.row_labels}): it has no per-stage accuracies to follow")
    stack = np.stack([s.matrix() for s in summaries])  # seeds x (T + 1) x T
    tasks = first.tasks
    T = len(tasks)
    fig = _figure(max(7.0, 3.0 + 0.3 * T), 4.4)
    ax = fig.add_subplot()
    # tab10 colours, then the same colours dashed with other markers: tab20's paired light
    # shades are hard to tell apart in print.
    colors, markers = mpl.colormaps["tab10"].colors, "osD^v<>ph*"
    with warnings.catch_warnings():  # a stage missing in every seed is a gap, not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        for j, task in enumerate(tasks):
            x = np.arange(j + 1, T + 1)
            ys = stack[:, j + 1:, j]
            mean = np.nanmean(ys, axis=0)
            color, cycle = colors[j % 10], j // 10
            ax.plot(x, mean, marker=markers[cycle % len(markers)],
                    markersize=3.5, linewidth=1.4, color=color,
                    linestyle=("-", "--", ":", "-.")[cycle % 4], label=f"{j + 1}: {task}")
            if len(summaries) > 1:
                ax.fill_between(x, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=color,
                                alpha=0.15, linewidth=0)
    ax.set_xticks(range(1, T + 1))
    ax.set_xlim(0.7, T + 0.3)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("stage (tasks learned so far)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    seeds = sorted(s.seed for s in summaries)
    band = "\nline: mean over seeds; band: min to max" if len(seeds) > 1 else ""
    ax.set_title(f"{first.label} on {first.sequence}: each task's accuracy after it is "
                 f"learned\nprofile {first.profile}, {first.benchmark['kind']} benchmark, "
                 f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}{band}")
    # Beside the axes, below the title's height: constrained layout makes room for it.
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0,
              title="task (stage learned)", ncols=2 if T > 16 else 1)
    return _save(fig, out_stem, formats)


@_styled
def aa_with_ci(table: pd.DataFrame, out_stem: Path, title: str,
               formats: dict[str, int | None] = FORMATS) -> list[Path]:
    """AA per method (columns method, mean, ci_low, ci_high; optional n), one row per method in
    the order given, with the confidence interval as an error bar where it is known."""
    missing = {"method", "mean", "ci_low", "ci_high"} - set(table.columns)
    if missing:
        raise ValueError(f"aa_with_ci: table lacks columns {sorted(missing)}")
    if table["mean"].isna().all():
        raise ValueError("aa_with_ci: no method has a mean AA to draw")
    table = table.reset_index(drop=True)
    y = np.arange(len(table))
    fig = _figure(6.5, 1.4 + 0.38 * max(len(table), 2))
    ax = fig.add_subplot()
    known = table["ci_low"].notna() & table["ci_high"].notna()
    if known.any():
        ax.errorbar(table["mean"][known], y[known],
                    xerr=[table["mean"][known] - table["ci_low"][known],
                          table["ci_high"][known] - table["mean"][known]],
                    fmt="o", color="C0", ecolor="C0", capsize=4, label="mean, 95% CI")
    if (~known).any():
        ax.plot(table["mean"][~known], y[~known], "o", color="C1", label="mean (no CI: n < 2 "
                "or no spread)")
    for i, row in table.iterrows():
        note = f"{row['mean']:.1f}" + (f"  (n={int(row['n'])})" if "n" in table else "")
        end = row["ci_high"] if not math.isnan(row["ci_high"]) else row["mean"]
        ax.annotate(note, (end, i), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_yticks(y, table["method"])
    ax.set_ylim(len(table) - 0.5, -0.5)  # first method on top, as in a table
    # Zoom to the data (low-accuracy benchmarks would otherwise fill a tenth of the width),
    # keeping 0 as the origin and room right of the last tick for the annotations.
    top = np.nanmax(table[["mean", "ci_high"]].to_numpy(float))
    right = min(100, 10 * math.ceil(top / 10 + 0.5))
    ax.set_xlim(0, right * 1.18)
    ax.set_xticks(range(0, right + 1, 20 if right > 50 else 10 if right > 20 else 5))
    ax.set_xlabel("AA (%)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)  # never over a point
    ax.set_title(title)
    return _save(fig, out_stem, formats)


def bootstrap_ci(values) -> tuple[float, float]:
    """The 95% bootstrap interval of `harness.stats.describe`; NaN (no bar) when fewer than 2
    values or no spread."""
    d = describe(np.asarray(values, dtype=float))
    if d["n"] < 2 or d["ci_low"] == d["ci_high"]:
        return math.nan, math.nan
    return d["ci_low"], d["ci_high"]


def aa_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method (paper order, then alphabetical): mean AA, its bootstrap CI and n, pooling
    every sequence and seed of the method. `runs` has columns method and AA."""
    rows = []
    for method, values in runs.groupby("method")["AA"]:
        values = values.dropna().to_numpy(float)
        if not len(values):  # no run of this method has an AA: nothing to draw
            continue
        low, high = bootstrap_ci(values)
        rows.append({"method": method, "mean": values.mean(),
                     "ci_low": low, "ci_high": high, "n": len(values)})
    return pd.DataFrame(sorted(rows, key=lambda r: method_key(r["method"])),
                        columns=["method", "mean", "ci_low", "ci_high", "n"])


def draw_all(results: Path, out_dir: Path, profile: str | None = None,
             formats: dict[str, int | None] = FORMATS,
             kinds: tuple[str, ...] = ("aa", "forgetting", "heatmap")
             ) -> Iterator[tuple[str, str | None, list[Path]]]:
    """Every figure of `kinds` for a results tree, as (kind, method label or None, paths):
    `aa_<profile>_<kind>` (kind "aa"), `forgetting/<profile>-<method>-<sequence>` ("forgetting";
    not for joint runs) and `heatmaps/<profile>-<method>-<sequence>-seed<s>` ("heatmap"). Runs
    without summary.json are incomplete and skipped; a tuned run is a method of its own."""
    results, out_dir = Path(results), Path(out_dir)
    if not results.is_dir():
        raise HarnessError(f"--results {results}: no such directory")
    summaries = read_summaries(results, profile)
    runs = pd.DataFrame([{"profile": s.profile, "kind": s.benchmark["kind"],
                          "method": s.label, "AA": s.metrics.get("AA")}
                         for s in summaries], columns=["profile", "kind", "method", "AA"])
    runs["AA"] = pd.to_numeric(runs["AA"], errors="coerce")  # null AA -> NaN, left out
    for (prof, kind), group in runs.groupby(["profile", "kind"], sort=True):
        table = aa_table(group)
        if not table.empty and "aa" in kinds:
            yield "aa", None, aa_with_ci(
                table, out_dir / f"aa_{prof}_{kind}",
                f"Average accuracy (AA) per method; profile {prof}, {kind} benchmark\nall "
                "sequences and seeds pooled; 95% bootstrap CI of the mean", formats)
    curves = defaultdict(list)
    for s in summaries:
        if not s.joint:
            curves[s.profile, s.label, s.sequence].append(s)
    figures = [("forgetting", label, forgetting_curves,
                (group, out_dir / "forgetting" / f"{prof}-{_file_name(label)}-{sequence}", formats))
               for (prof, label, sequence), group in sorted(curves.items()) if "forgetting" in kinds]
    figures += [("heatmap", s.label, accuracy_heatmap, (s, out_dir / "heatmaps" / (
                    f"{s.profile}-{_file_name(s.label)}-{s.sequence}-seed{s.seed}"), formats))
                for s in summaries if "heatmap" in kinds]
    drawn = _drawn([(draw, args) for _, _, draw, args in figures])
    for (kind, label, _, _), paths in zip(figures, drawn):
        yield kind, label, paths


PER_PROCESS = 16  # figures worth a process of their own (one starts in seconds, imports included)


def _drawn(figures: list[tuple]) -> Iterator[list[Path]]:
    """Each (draw, args)'s paths, in order; side by side on the cores this process may use when
    there are many (matplotlib draws on one core: the 120 runs of `make run` made 19 s of
    figures)."""
    workers = min(usable_cores(), len(figures) // PER_PROCESS)
    if workers < 2:
        yield from (draw(*args) for draw, args in figures)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_draw, figures, chunksize=4)


def _draw(figure: tuple) -> list[Path]:
    draw, args = figure
    return draw(*args)


def _file_name(label: str) -> str:
    return label.replace(TUNED, "-tuned")


def write_all(results: Path, out_dir: Path, profile: str | None = None) -> list[Path]:
    """Every figure of `draw_all`, as PNG and PDF."""
    return [path for _, _, paths in draw_all(results, out_dir, profile) for path in paths]

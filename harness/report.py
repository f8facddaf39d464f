"""`harness report`: one self-contained HTML page of a results folder.

The page holds the paper-layout and full tables, the comparison with published numbers, every
figure of `harness.plots` (inline PNG), and each run's provenance (profile, backbone, data,
library versions, fingerprint, times). Styles, script and images are inside the file, so it opens
from disk with no server and no network. Its tables sort by a click on a heading, and a method
filter hides the other methods' rows and figures (`index.html#methods=olora,nlora` opens filtered).
"""

from __future__ import annotations

import base64
import datetime
import html
import importlib.metadata
import tempfile
from pathlib import Path
from string import Template

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex

from harness import table
from harness.errors import HarnessError
from harness.plots import DARK_TEXT_ABOVE, draw_all, matrix_panels, stage_labels
from harness.rows import sorted_methods
from harness.store import read_json, write_atomic
from harness.summary import Summary, read_summaries

TEMPLATE = Path(__file__).with_name("templates") / "report.html.tmpl"
PAGE = "index.html"
DPI = 110  # a page shows figures at screen size; the 200 dpi of `table --out` would double its size
FIGURE_KINDS = {"aa": "AA per method, 95% CI", "forgetting": "Forgetting curves"}
MATRICES = "Accuracy matrices (R, and O beside it)"


def check_out(out: Path) -> None:
    """`--out` must be a folder or not exist yet (checked before anything is computed)."""
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {out}: not a directory")


def write_report(results: Path, out: Path, profile: str | None = None,
                 reference: str | None = None, backbone: str | None = None) -> Path:
    """Write `<out>/index.html` for the complete runs under `results`; returns its path."""
    results, out = Path(results), Path(out)
    check_out(out)
    runs = table.load_summaries(results, profile)
    if runs.empty:
        raise HarnessError(f"{results}: no complete runs found")
    if reference and reference not in set(runs["method"]):
        raise HarnessError(f"--reference {reference}: no runs of that method in {results}")
    sections = [
        ("leaderboard", "Leaderboard (paper layout)", table.paper_table(runs, "html")
         or '<p class="note">No run is on the benchmark orders 1-6.</p>'),
        ("metrics", "Every metric and the paired tests", table.full_tables(runs, "html", reference)),
        ("published", "Published numbers", _published(runs, backbone or "t5-large")),
        ("figures", "Figures", _figures(results, profile)),
        ("runs", "Runs and their provenance", _provenance(results, profile)),
    ]
    version = importlib.metadata.version("cl-harness")
    page = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=html.escape(f"Continual-learning results: {results.resolve().name}"),
        meta=html.escape(f"{results.resolve()}; {len(runs)} complete runs of "
                         f"{runs['method'].nunique()} methods; written "
                         f"{datetime.datetime.now().isoformat(timespec='seconds')} by cl-harness "
                         f"{version}"),
        nav=" ".join(f'<a href="#{key}">{name}</a>' for key, name, _ in sections),
        checkboxes=" ".join(
            f'<label><input type="checkbox" value="{html.escape(m)}" checked> {html.escape(m)}'
            "</label>" for m in sorted_methods(runs["method"].unique())),
        sections="\n".join(f'<section id="{key}">\n<h2>{name}</h2>\n{body}\n</section>'
                           for key, name, body in sections))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / PAGE, page)
    return out / PAGE


def _published(runs: pd.DataFrame, backbone: str) -> str:
    try:
        return table.compare_published(runs, backbone, "html")
    except HarnessError as exc:  # no run on orders 1-6, or no published numbers
        return f'<p class="note">{html.escape(str(exc))}</p>'


def _figures(results: Path, profile: str | None) -> str:
    """Every figure as an inline PNG, and every run's accuracy matrices as coloured tables (numbers
    stay text; drawn as images, the heatmaps of a 102-run sweep took two thirds of the page's
    time, 87 of 128 s); the per-run and per-sequence ones folded per method."""
    parts: dict[str, dict[str | None, list[str]]] = {kind: {} for kind in FIGURE_KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, method, (png,) in draw_all(results, Path(tmp), profile, formats={".png": DPI},
                                             kinds=tuple(FIGURE_KINDS)):
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts[kind].setdefault(method, []).append(
                f'<figure><img alt="{html.escape(png.stem)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(png.stem)}</figcaption></figure>")
    parts[MATRICES] = {}
    for s in read_summaries(results, profile):
        parts[MATRICES].setdefault(s.label, []).append(_matrices(s))
    out = []
    for kind, heading in [*FIGURE_KINDS.items(), (MATRICES, MATRICES)]:
        if not parts[kind]:
            continue
        out.append(f"<h3>{heading}</h3>")
        for method, figures in parts[kind].items():
            body = f'<div class="figures">{"".join(figures)}</div>'
            out.append(body if method is None else
                       f'<details data-method="{html.escape(method)}"{" open" if kind != MATRICES else ""}>'
                       f"<summary>{html.escape(method)} ({len(figures)})</summary>{body}</details>")
    return "\n".join(out)


def _matrices(s: Summary) -> str:
    """One run's R, and O beside it when the run stored predictions, coloured as the heatmaps are
    (`harness.plots.accuracy_heatmap`); a cell not evaluated is hatched."""
    tables = []
    for M, title, colours in matrix_panels(s):
        head = "".join(f"<th>{html.escape(t)}</th>" for t in s.tasks)
        rows = []
        for name, values in zip(stage_labels(s), M):
            cells = "".join('<td class="missing"></td>' if np.isnan(v) else
                            f'<td style="background:{to_hex(colormaps[colours](v / 100))};'
                            f'color:{"#000" if v > DARK_TEXT_ABOVE else "#fff"}">{v:.1f}</td>'
                            for v in values)
            rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
        tables.append(f'<table class="matrix"><caption>{title}</caption><thead><tr><th>after '
                      f'stage</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    name = f"{s.profile}-{s.label}-{s.sequence}-seed{s.seed}"
    return (f'<figure class="matrices"><div class="scroll">{"".join(tables)}</div>'
            f"<figcaption>{html.escape(name)}</figcaption></figure>")


def _provenance(results: Path, profile: str | None) -> str:
    """One row per complete run: what produced it and how long it took."""
    rows = []
    for s in read_summaries(results, profile):
        config = read_json(s.folder / "config.json") if (s.folder / "config.json").exists() else {}
        versions = config.get("versions", {})
        rows.append({"method": s.label, "sequence": s.sequence, "seed": s.seed,
                     "profile": s.profile, "backbone": s.model or "-",
                     "data": f"{s.benchmark['kind']} ({s.benchmark.get('data_dir', '-')})",
                     "versions": ", ".join(f"{k} {v}" for k, v in versions.items()) or "-",
                     "fingerprint": s.fingerprint or "-", "AA": s.metrics.get("AA"),
                     "train+eval s": s.train_eval_seconds, "train s": s.train_seconds,
                     "eval s": s.eval_seconds, **_efficiency_cells(s.efficiency),
                     "folder": str(s.folder.relative_to(results))})
    frame = pd.DataFrame(rows).set_index("method")
    return table.render(frame, "html", f"{len(frame)} runs",
                        "train+eval s: the stages' training and evaluation; train TFLOP/s: the "
                        "training FLOPs over the training time, and its share of the device's "
                        "peak (peak: its source); the fingerprint names the configuration, data "
                        "and code version that produced the run.")


def _efficiency_cells(efficiency: dict | None) -> dict:
    if not efficiency:
        return {"train TFLOP/s": None, "% of peak": None, "peak": "-"}
    return {"train TFLOP/s": round(efficiency["achieved_flops"] / 1e12, 4),
            "% of peak": round(100 * efficiency["share_of_peak"], 2),
            "peak": f"{efficiency['peak_flops'] / 1e12:.3g} TFLOP/s "
                    f"({efficiency['peak_source']})"}

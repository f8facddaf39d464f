"""Leaderboards from a results tree (reads only `summary.json` files and `baselines/`).

Three tables, each rendered to markdown, LaTeX or CSV and headed by where its numbers come from:
- `paper`: the O-LoRA/GORP layout, methods x (orders 1-3, their average, orders 4-6, their average);
- `full`: per benchmark group (orders 1-3, orders 4-6, or a custom sequence), every metric with
  mean +- std, a bootstrap CI, paired tests against the best method and a reference, and marks;
- `compare`: each of our AA cells beside the published number for the same method and order.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from harness import stats
from harness.benchmark import load_benchmark
from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT
from harness.rows import method_key, plugin_of, sorted_methods
from harness.summary import TUNED, final_outcomes, read_summaries
from harness_methods.registry import table_entry

BASELINES_DIR = PROJECT_ROOT / "baselines"
# Methods appear in the order their plugins declare (`table_rank`); others follow alphabetically.
METRICS = ["AA", "BWT", "FWT", "forgetting", "LA", "BWT_format", "forgetting_format"]
PARAMETER_METRICS = ["ACR", "GSR_hoyer", "OO"]
COMPARED_PARAMETERS = ["AWOM", "nuclear_norm"]  # loaded for --compare-published only
LEGEND = (
    "AA: mean over tasks of the last row of R (%). BWT: mean over j<T of R[T][j] - R[j][j] "
    "(Lopez-Paz & Ranzato). FWT: mean over j>1 of R[j-1][j] - R[0][j], R[0] the untrained model. "
    "forgetting (F.Ra): mean over j<T of max_{j<=k<T} R[k][j] - R[T][j]. LA: mean of the diagonal "
    "R[j][j]. BWT_format / forgetting_format: the part of BWT / forgetting from answers that "
    "left the task's label set (format forgetting; the rest is answers changed to a wrong label). "
    "ACR: fraction of positions where two tasks' dW exceed tau = 1e-5, mean over task pairs "
    "and layers. GSR_hoyer: ||dW||_1 / (sqrt(mn) ||dW||_F), lower = sparser, mean over tasks and "
    "layers. OO: sum_{i<T} ||A_i A_T^T||_F^2, mean over layers (LoRA methods only). Significance: "
    "runs paired by (order, seed); paired t-test and Wilcoxon signed-rank, Holm-adjusted across "
    "the methods of the group; ** marks the best AA, + a result not significantly different from it "
    "(Holm-adjusted t-test p >= 0.05); 95% CI: bootstrap (BCa) of the mean. McNemar: exact test "
    "on the same test items as the best method (paired by sequence and seed, pooled), from the "
    "stored predictions; a / b: items only this method / only the best got right. (tuned): settings "
    "chosen by `harness tune` on a held-out split of train.json; other rows: the methods' config "
    "files.")


def order_group(sequence: str) -> str:
    if sequence in ("order1", "order2", "order3"):
        return "orders 1-3"
    if sequence in ("order4", "order5", "order6"):
        return "orders 4-6"
    return sequence


def _group_title(group_name: str, group: pd.DataFrame) -> str:
    """An order group as its runs cover it: "orders 1-3", or "order 1" where only order 1 ran."""
    orders = sorted(int(order) for order in group["order"].dropna().unique())
    if not group_name.startswith("orders ") or len(orders) == 3:
        return group_name
    return ("order " if len(orders) == 1 else "orders ") + ", ".join(map(str, orders))


def _folder_name(benchmark: dict) -> str:
    """The data folder by its name alone: runs of one sweep made or resumed on machines that mount
    the benchmark at different paths share its tables (their fingerprints name the data by content)."""
    return Path(str(benchmark.get("data_dir") or "-")).name


def load_summaries(results: Path, profile: str | None = None) -> pd.DataFrame:
    """One row per complete run: identity, metrics and parameter metrics."""
    root = Path(results)
    if not root.is_dir():
        raise HarnessError(f"--results {root}: no such directory")
    rows = []
    for s in read_summaries(root, profile):
        bench = s.benchmark
        split = f" [{bench['split']} split]" if "split" in bench else ""
        params = s.parameter_metrics or {}
        rows.append({"profile": s.profile, "method": s.label,
                     "sequence": s.sequence,
                     "order": s.order, "seed": s.seed, "model": s.model or "",
                     "kind": bench["kind"], "benchmark": f"{bench['kind']} ({_folder_name(bench)}){split}",
                     **s.metrics,
                     **{k: params.get(k) for k in PARAMETER_METRICS + COMPARED_PARAMETERS},
                     "path": str(s.folder)})
    df = pd.DataFrame(rows)
    for column in METRICS + PARAMETER_METRICS + COMPARED_PARAMETERS:
        if column in df:
            df[column] = pd.to_numeric(df[column], errors="coerce")
    return df


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_index(key=lambda idx: pd.Index([method_key(m) for m in idx]))


def render(frame: pd.DataFrame, fmt: str, title: str, legend: str = "") -> str:
    """One table with its title and legend, as Markdown (github), LaTeX, CSV or an HTML fragment
    (title as a heading, notes as paragraphs, cells escaped)."""
    if fmt == "csv":
        return f"# {title}\n" + frame.to_csv(float_format="%.2f")
    frame = frame.astype(object).where(frame.notna(), None)  # tabulate prints None as missingval
    body = frame.to_markdown(tablefmt={"latex": "latex", "html": "html"}.get(fmt, "github"),
                             floatfmt=".2f", missingval="-")
    if fmt != "html":
        return "\n\n".join(filter(None, [title, body, legend]))
    heading, *notes = title.splitlines()
    paragraph = '<p class="note">{}</p>'.format
    return "\n".join([f"<h3>{html.escape(heading)}</h3>",
                      *(paragraph(html.escape(line)) for line in notes),
                      '<div class="scroll">' + body.replace("<table>", '<table class="sortable">', 1)
                      + "</div>",
                      *(paragraph(html.escape(line)) for line in legend.splitlines())])


def _blocks(df: pd.DataFrame):
    """Groups that may share a table: same profile, backbone and benchmark."""
    for (profile, model, benchmark), group in df.groupby(["profile", "model", "benchmark"],
                                                         sort=True):
        yield f"profile {profile}; backbone {model}; benchmark {benchmark}", group


def paper_table(df: pd.DataFrame, fmt: str = "github", metric: str = "AA") -> str:
    """Rows = methods; columns = orders 1, 2, 3, their average, orders 4, 5, 6, their average
    (mean over seeds; an average only when all three orders exist)."""
    out = []
    for where, group in _blocks(df[df["order"].notna()]):
        cells = group.pivot_table(index="method", columns="order", values=metric, aggfunc="mean")
        table = pd.DataFrame(index=cells.index)
        for orders in ((1, 2, 3), (4, 5, 6)):
            for k in orders:
                table[f"Order {k}"] = cells[k] if k in cells else np.nan
            table[f"Avg {orders[0]}-{orders[-1]}"] = table[[f"Order {k}" for k in orders]].mean(
                axis=1, skipna=False)
        table = table.dropna(axis=1, how="all")
        seeds = group.groupby(["method", "sequence"]).seed.nunique()
        title = (f"{metric} (%), paper layout; {where}; seeds per cell {seeds.min()}-{seeds.max()}")
        out.append(render(_sorted(table), fmt, title))
    return "\n\n".join(out)  # empty when no run is on orders 1-6


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def full_tables(df: pd.DataFrame, fmt: str = "github", reference: str | None = None,
                metric: str = "AA") -> str:
    """Per benchmark group: every metric (mean over runs), mean +- std and CI of `metric`, paired
    tests against the best method (and `reference`), and the significance marks."""
    out = []
    for where, block in _blocks(df):
        for group_name, group in block.groupby(block["sequence"].map(order_group)):
            comparison = stats.compare(group, metric=metric, reference=reference)
            means = group.groupby("method")[[c for c in METRICS + PARAMETER_METRICS
                                             if c in group]].mean()
            rows = {}
            for method, row in comparison.iterrows():
                mark = "**" if row["best"] else ("+" if row["tied"] else "")
                entry = {metric: f"{mark}{_pm(row['mean'], row['std'])}{mark if mark == '**' else ''}",
                         "95% CI": "-" if math.isnan(row["ci_low"])
                         else f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]", "n": int(row["n"])}
                entry.update({c: means.loc[method, c] for c in means.columns if c != metric})
                for label in ("best", "ref"):
                    if f"vs_{label}_t_p_holm" in comparison:
                        t, w = row[f"vs_{label}_t_p_holm"], row[f"vs_{label}_w_p_holm"]
                        entry[f"p vs {label} (t / W, Holm)"] = (
                            "-" if (isinstance(t, float) and math.isnan(t)) and
                            (isinstance(w, float) and math.isnan(w))
                            else f"{t:.3g} / {w:.3g}".replace("nan", "n/a"))
                rows[method] = entry
            table = pd.DataFrame(rows).T
            table.index.name = "method"
            notes = sorted({n for label in ("best", "ref")
                            for n in comparison.get(f"vs_{label}_note", pd.Series()).dropna()
                            if n})
            best = comparison.index[0]
            title = (f"{_group_title(group_name, group)}; {where}; runs per method {int(comparison['n'].min())}-"
                     f"{int(comparison['n'].max())} (orders x seeds); best: {best}"
                     + (f"; reference: {reference}" if reference else ""))
            per_example = per_example_tests(group, best)
            table["McNemar p vs best (a / b)"] = pd.Series(
                {m: f"{t.p:.3g} ({t.a_only} / {t.b_only})" for m, t in per_example.items()})
            table = table.fillna({"McNemar p vs best (a / b)": "-"})
            title += "\n" + power_note(comparison, per_example)
            legend = LEGEND + ("\nNot tested: " + "; ".join(notes) if notes else "")
            out.append(render(table, fmt, title, legend if fmt != "csv" else ""))
    return "\n\n".join(out)


def load_published(directory: Path = BASELINES_DIR) -> pd.DataFrame:
    files = sorted(Path(directory).glob("*.csv"))
    if not files:
        raise HarnessError(f"{directory}: no published baselines (*.csv)")
    frames = []
    for path in files:
        try:
            frames.append(pd.read_csv(path, dtype={"order": str}))
        except (OSError, pd.errors.ParserError) as exc:
            raise HarnessError(f"{path}: unreadable baseline CSV ({exc})") from exc
    published = pd.concat(frames, ignore_index=True)
    # GainLoRA calls average accuracy AP.
    published["metric"] = published["metric"].replace({"AP": "AA"})
    return published


def compare_published(df: pd.DataFrame, backbone: str, fmt: str = "github",
                      directory: Path = BASELINES_DIR) -> str:
    """Our mean AA per method and order (and the order-group averages) beside every published
    number for the same method, order and `backbone`, with the difference (ours - published)."""
    everything = load_published(directory)
    published = everything[(everything["model"] == backbone) & (everything["metric"] == "AA")].copy()
    # Each number under the order with its sequence's tasks, whatever its source calls it.
    bench = load_benchmark()
    published["order"] = [bench.our_label(paper, str(label))
                          for paper, label in zip(published["paper"], published["order"])]
    out = []
    for where, group in _blocks(df[df["order"].notna()]):
        rows = _beside_published(group, published)
        if not rows:
            continue
        table = pd.DataFrame(rows).set_index("method")
        correlation = rank_correlation(table)
        title = (f"AA (%): ours vs published ({backbone}); ours: {where}; seeds per cell "
                 f"{group.groupby(['method', 'sequence']).seed.nunique().min()}-"
                 f"{group.groupby(['method', 'sequence']).seed.nunique().max()}")
        if backbone not in where:
            title += f"\nNote: our backbone differs from the published {backbone}; compare trends only."
        title += ("\nsecondary = read in another paper's reprint or in notes, not in the paper "
                  "itself (baselines/SOURCES.md)")
        out.append(render(table, fmt, title, correlation))
        same_backbone = everything[everything["model"] == backbone]
        pair = published_pair(same_backbone)
        parameters = compare_parameters(group, same_backbone, pair) if pair else None
        if parameters is not None:
            out.append(render(parameters, fmt, f"Parameter metrics: ours vs published ({backbone}); "
                               f"ours: {where}, mean over runs", parameter_definitions(pair)))
    if not out:
        raise HarnessError("no runs on the benchmark orders 1-6 to compare with published numbers")
    return "\n\n".join(out)


def _beside_published(group: pd.DataFrame, published: pd.DataFrame) -> list[dict]:
    """One row per method, order (and order-group average) and matching published AA."""
    ours = group.groupby(["method", "order"])["AA"].mean()
    rows = []
    for method in sorted_methods(group["method"].unique()):
        cells = {str(int(k)): v for (m, k), v in ours.items() if m == method}
        for name, orders in (("avg_1_3", "123"), ("avg_4_6", "456")):
            if all(k in cells for k in orders):
                cells[name] = float(np.mean([cells[k] for k in orders]))
        paper_name = table_entry(plugin_of(method))[1]
        for order, value in cells.items():
            matches = published[(published["method"] == paper_name) & (published["order"] == order)]
            for _, pub in (matches.iterrows() if len(matches) else [(None, None)]):
                rows.append({"method": method, "order": order, "ours": value,
                             "published": np.nan if pub is None else pub["value"],
                             "ours - published": np.nan if pub is None else value - pub["value"],
                             "source": "-" if pub is None else
                             f"{pub['paper']} {pub['table'].split('[')[0].strip()}",
                             "secondary": "-" if pub is None else
                             ("yes" if "SECONDARY" in pub["table"] else "no")})
    return rows


def per_example_tests(group: pd.DataFrame, best: str) -> dict[str, stats.McNemar]:
    """McNemar's exact test of each method against `best` on the same test items (runs paired by
    sequence and seed, items pooled over the pairs), from the stored predictions."""
    outcomes = {}
    for row in group.itertuples():
        outcomes.setdefault(row.method, {}).update(
            {(row.sequence, row.seed, *item): ok for item, ok in final_outcomes(row.path).items()})
    return {m: stats.mcnemar_exact(outcomes[m], outcomes[best])
            for m in outcomes if m != best and outcomes[m] and outcomes[best]}


def power_note(comparison: pd.DataFrame, per_example: dict[str, stats.McNemar]) -> str:
    """The smallest AA difference from the best method this table could detect (ALPHA, power
    0.8): run-level, from the spread of each method's paired differences to the best
    (`stats.compare`); per example, from the share of items on which two methods disagree
    (medians over the methods)."""
    others = comparison[~comparison["best"]]
    runs = [stats.detectable_difference(sd, int(n))
            for sd, n in zip(others["vs_best_sd"], others["vs_best_pairs"])]
    items = [stats.detectable_difference_items(t.discordant_rate, t.items)
             for t in per_example.values()]
    runs_per_method = int(comparison["n"].max())

    def show(values: list[float], what: str) -> str:
        finite = [v for v in values if math.isfinite(v)]
        return f"{np.median(finite):.1f} points {what}" if finite else f"- {what}"

    return ("Smallest AA difference from the best detectable (alpha 0.05, power 0.8): "
            f"{show(runs, f'with the paired t-test over {runs_per_method} runs')}, "
            f"{show(items, 'with McNemar over the pooled test items')}")


# Published parameter metric -> (our summary key, factor to its unit, what ours is).
PUBLISHED_PARAMETERS = {
    "collision_rate": ("ACR", 100.0, "ACR x 100: % of positions where two tasks' dW both exceed "
                       "tau = 1e-5, mean over task pairs and layers"),
    "orthogonality": ("AWOM", 1.0, "AWOM: sum_{i<T} ||dW_T^T dW_i||_F^2, mean over layers"),
    "nuclear_norm": ("nuclear_norm", 1.0, "||dW_t||_*, mean over tasks and layers"),
}


def parameter_definitions(pair: tuple[str, str]) -> str:
    own, other = pair
    return ("The paper publishes no code for these metrics: its collision threshold and the exact "
            "form of its orthogonality are not known, and its numbers average T5-large runs over "
            f"orders 1-6, so compare the ratio of {own} to {other} (scale-free) rather than the "
            "values.")


def published_pair(published: pd.DataFrame) -> tuple[str, str] | None:
    """The method whose paper publishes the parameter metrics and the one baseline it reports
    them beside (N-LoRA's figures: N-LoRA and O-LoRA), read from the published rows; None when
    the rows name no such pair."""
    rows = published[published["metric"].isin(PUBLISHED_PARAMETERS)]
    papers = rows["paper"].unique()
    if len(papers) != 1:
        return None
    others = [m for m in rows["method"].unique() if m != papers[0]]
    return (papers[0], others[0]) if len(others) == 1 and papers[0] in set(rows["method"]) else None


def compare_parameters(group: pd.DataFrame, published: pd.DataFrame, pair: tuple[str, str]
                       ) -> pd.DataFrame | None:
    """Our parameter metrics beside the published ones, with each metric's ratio of the
    publishing paper's method to its baseline (`pair`, from `published_pair`) on both sides; None
    when none of our methods has a published figure."""
    runs = group[~group["method"].str.endswith(TUNED)]
    ours_by_name = {table_entry(m)[1]: m for m in runs["method"].unique()}
    own, other = pair

    def ratio(values: pd.Series) -> float:
        return values.get(own, np.nan) / values.get(other, np.nan)

    rows = []
    for metric, (key, unit, definition) in PUBLISHED_PARAMETERS.items():
        theirs = published[published["metric"] == metric].groupby("method")["value"].mean()
        ours = pd.Series({name: runs.loc[runs["method"] == ours_by_name[name], key].mean() * unit
                          for name in theirs.index if name in ours_by_name}, dtype=float)
        rows += [{"metric": metric, "method": name, "ours": ours.get(name, np.nan),
                  "published": value, f"{own} / {other} (ours)": ratio(ours),
                  f"{own} / {other} (published)": ratio(theirs), "ours as": definition}
                 for name, value in theirs.items()]
    table = pd.DataFrame(rows)
    if table.empty or table["ours"].isna().all():
        return None
    return table.set_index("metric")


def rank_correlation(comparison: pd.DataFrame) -> str:
    """Per order: Kendall's tau-b (`scipy.stats.kendalltau`, ties handled) between our AA and the
    published AA over the methods that have both (a method's published numbers averaged when
    several papers give one), with its two-sided p-value; does the ranking of methods carry over?"""
    lines = []
    pairs = comparison.dropna(subset=["published"]).reset_index()
    for order, group in pairs.groupby("order", sort=True):
        per_method = group.groupby("method")[["ours", "published"]].mean()
        if len(per_method) < 3:
            continue
        tau, p = scipy.stats.kendalltau(per_method["ours"], per_method["published"])
        lines.append(f"order {order}: Kendall's tau {tau:.2f} (p = {p:.3g}, {len(per_method)} "
                     f"methods: {', '.join(per_method.sort_values('published').index)})")
    if not lines:
        return ""
    return "Rank correlation of our AA with the published AA, per order (tau-b, two-sided):\n" + \
        "\n".join(lines)


def leaderboard(results: Path, profile: str | None = None, fmt: str = "github",
                layouts: tuple[str, ...] = ("paper", "full"), reference: str | None = None,
                backbone: str | None = None) -> dict[str, str]:
    """The requested tables, by layout name."""
    df = load_summaries(results, profile)
    if df.empty:
        raise HarnessError(f"{results}: no complete runs found")
    if reference and reference not in set(df["method"]):
        raise HarnessError(f"--reference {reference}: no runs of that method in {results}")
    tables = {}
    if "paper" in layouts:
        tables["paper"] = paper_table(df, fmt)
        if not tables["paper"] and layouts == ("paper",):
            raise HarnessError(f"{results}: no runs on the benchmark orders 1-6 (the paper "
                               "layout needs them)")
    if "full" in layouts:
        tables["full"] = full_tables(df, fmt, reference)
    if "compare" in layouts:
        tables["compare"] = compare_published(df, backbone or "t5-large", fmt)
    return {name: text for name, text in tables.items() if text}

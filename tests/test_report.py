"""`harness report`: one self-contained page, checked as written and as a real browser shows it
(headless Chromium: every method row and every figure rendered, the filter and sort links work)."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image

from harness.cli import main
from harness.report import write_report
from tests.test_table import write_summary

METHODS = ["seqlora", "olora", "olora (tuned)"]
FIGURES = 1 + 7  # AA plot; forgetting curves per method and order
RUNS = 7  # each with its accuracy matrices, as tables


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """Two methods on orders 1-3 and one tuned run, one with its config.json; the page of them."""
    root = tmp_path_factory.mktemp("report") / "results"
    for order in (1, 2, 3):
        write_summary(root, "olora", order, 0, AA=70 + order)
        write_summary(root, "seqlora", order, 0, AA=40 + order)
    untuned = root / "default" / "olora" / "order1" / "seed0"
    tuned = shutil.copytree(untuned, untuned.with_name("seed0-tuned"))
    summary = json.loads((tuned / "summary.json").read_text())
    summary.update(tuned={"lr": 1e-3}, fingerprint="feedfacecafe0001",
                   metrics={**summary["metrics"], "AA": 99.0})
    (tuned / "summary.json").write_text(json.dumps(summary))
    (tuned / "config.json").write_text(json.dumps({"versions": {"torch": "9.9.9-test"}}))
    return write_report(root, root.parent / "site")


def test_the_page_holds_every_table_figure_and_run_and_needs_nothing_else(page):
    text = page.read_text(encoding="utf-8")
    for method in METHODS:
        assert f'<input type="checkbox" value="{method}" checked>' in text
        assert len(re.findall(rf"<tr><td>{re.escape(method)}\s*</td>", text)) >= 3  # every table
    for section in ("leaderboard", "metrics", "published", "figures", "runs"):
        assert f'<section id="{section}">' in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == FIGURES
    matrices = r'<figure class="matrices"><div class="scroll"><table class="matrix">'
    assert len(re.findall(matrices, text)) == RUNS
    for data in images:  # each a whole PNG
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    # Nothing from outside the file: no stylesheet, script or image by address.
    assert not re.findall(r'(?:src|href)="(?!data:|#)', text) and "<link" not in text
    assert "torch 9.9.9-test" in text and "feedfacecafe0001" in text  # provenance
    assert "99.00" in text  # the tuned run apart from the untuned one


def test_report_command_writes_into_the_results_folder_by_default(page, capsys):
    results = page.parent.parent / "results"
    assert main(["report", "--results", str(results), "--profile", "default"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {results / 'report' / 'index.html'}"
    assert (results / "report" / "index.html").stat().st_size > 10_000


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium (.ci/run does) to test the report page")
    if found is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return found


def browse(page, tmp_path, *options, fragment=""):
    """Load the page in headless Chromium; what it printed (the DOM with --dump-dom)."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
               *options, page.as_uri() + fragment]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Rendered(HTMLParser):
    """From Chromium's DOM: the body's attributes, each table's rows (first cell and whether it is
    hidden), and the hidden state of each method's figures."""

    def __init__(self, dom: str):
        super().__init__()
        self.body, self.tables, self.figures, self._row, self._cell = {}, [], {}, None, None
        self.feed(dom)
        self.rows = [row for rows in self.tables for row in rows]

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = {"hidden": "hidden" in attrs, "first": None}
        elif tag in ("td", "th") and self._row is not None and self._row["first"] is None:
            self._cell = []
        elif tag == "details" and "data-method" in attrs:
            self.figures[attrs["data-method"]] = "hidden" in attrs

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row["first"], self._cell = "".join(self._cell).strip(), None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None


def test_chromium_renders_every_figure_and_method_row(page, tmp_path):
    shown = Rendered(browse(page, tmp_path, "--dump-dom"))
    assert shown.body["data-figures"] == shown.body["data-figures-rendered"] == str(FIGURES)
    firsts = [row["first"] for row in shown.rows if not row["hidden"]]
    for method in METHODS:
        assert firsts.count(method) >= 3
    shot = tmp_path / "page.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    assert len(image.getcolors(maxcolors=1 << 20)) > 100  # text, table lines and a figure, not a blank page


def test_a_link_opens_the_page_filtered_and_sorted(page, tmp_path):
    shown = Rendered(browse(page, tmp_path, "--dump-dom", fragment="#methods=seqlora,olora&sort=AA"))
    rows = [row for row in shown.rows if row["first"] in METHODS]
    assert {row["first"] for row in rows if not row["hidden"]} == {"seqlora", "olora"}
    assert all(row["hidden"] for row in rows if row["first"] == "olora (tuned)")
    assert shown.figures == {"olora": False, "seqlora": False, "olora (tuned)": True}
    # Every table with an AA column is sorted by it, lowest first: the runs (in path order, olora
    # first) and the full table (best first).
    runs = [row["first"] for row in shown.tables[-1][1:] if not row["hidden"]]
    assert runs == ["seqlora"] * 3 + ["olora"] * 3
    full = shown.tables[1]
    assert [row["first"] for row in full[1:]] == ["seqlora", "olora", "olora (tuned)"]

"""The prepared GPU script runs end to end on a CPU at a tiny shape and writes its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fast_path_script_writes_its_rows(tmp_path):
    out = tmp_path / "fastpaths.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_fastpaths.py"), "--shape", "tiny",
                    "--source-len", "16", "--batch", "2", "4", "--steps", "2", "--warmup", "1",
                    "--only", "eager", "--out", str(out)], check=True, capture_output=True)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    named = [(r["variant"], r["batch"]) for r in rows]
    assert named[:5] == [("eager fp32", 2), ("eager autocast", 2), ("eager bf16 weights", 2),
                         ("eager autocast", 4), ("eager bf16 weights", 4)]
    # then the fast paths' attention (SDPA where the installed transformers offers it for T5)
    assert [b for _, b in named[5:]] == [2, 4] and named[5][0].startswith("eager bf16 weights ")
    assert all(r["ms_per_step"] > 0 and r["tflops"] > 0 for r in rows)
    assert "| eager fp32 | 2 |" in out.read_text()


def test_fast_path_script_runs_a_causal_shape(tmp_path):
    out = tmp_path / "causal.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_fastpaths.py"), "--shape",
                    "tiny-causal", "--source-len", "8", "--batch", "2", "4", "--steps", "1",
                    "--warmup", "1", "--only", "eager fp32", "--out", str(out)],
                   check=True, capture_output=True)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("eager fp32", 2)]
    assert rows[0]["tflops"] > 0


def test_gpu_script_times_the_harness_step_with_each_fast_path(tmp_path, synthetic_dir):
    out = tmp_path / "gpu.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--data-dir",
                    str(synthetic_dir), "--tiny", "--train", "16", "--test", "8", "--parts",
                    "fastpaths", "--fast-paths", "plain@0,aot_eager@8", "--fast-batches", "4",
                    "--out", str(out)], check=True, capture_output=True)
    text = out.read_text()
    assert "| seqlora fp32, batch 4, plain, pad to longest: ms/step" in text
    assert "| seqlora fp32, batch 4, aot_eager, pad to 8: ms/step" in text
    assert text.count("TFLOP/s |") == 2  # the fit's own FLOP count, over its time

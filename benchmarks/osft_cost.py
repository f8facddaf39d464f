"""What OSFT costs beside full fine-tuning, per targeted matrix shape of T5-large and LLaMA-2-7B.

    python benchmarks/osft_cost.py [--models t5-large,llama-2-7b|tiny] [--fraction 0.5] [--repeats 3]
                                   [--out benchmarks/RESULTS-osft.md]

For each shape of the matrices OSFT decomposes (T5-large: self-attention q, k, v, o and the
feed-forward wi, wo of its 48 blocks; LLaMA-2-7B: attention and MLP projections of its 32 layers),
on one random matrix of that shape (fp32), in one process:

* memory: the bytes OSFT keeps per matrix (the factors, the low factors' gradients and AdamW's two
  moments of them, the stage's starting copy for the deltas) against full fine-tuning's (the
  weight's gradient, AdamW's two moments, the starting copy), counted from the tensors' sizes;
* time at the stage's start: the thin SVD (`torch.linalg.svd`, as `harness_methods.osft.Factors`);
* time per step: OSFT's own work (factor gradients from W's, their projection, AdamW on the
  factors, the factors' projection, W rebuilt) against AdamW on W, on the same matrix.

Whole-model figures multiply by each shape's count. The protected share is `--fraction` (mid
sequence: 0.49 at the eighth of 15 tasks with max_fraction 0.98). Timings are the best of
`--repeats`; the SVD is timed once per shape (seconds each on a CPU for LLaMA's shapes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness_methods.osft import Factors  # noqa: E402

# (rows, columns) of each decomposed matrix shape, and how many the model has.
SHAPES = {
    "t5-large": {(1024, 1024): 48 * 4, (4096, 1024): 48, (1024, 4096): 48},
    "llama-2-7b": {(4096, 4096): 32 * 4, (11008, 4096): 32 * 2, (4096, 11008): 32},
    "tiny": {(64, 32): 2},  # the script's test
}
FLOAT = 4  # bytes


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory(m: int, n: int, k: int) -> tuple[int, int]:
    """Bytes beside the weight itself: (full fine-tuning, OSFT) for one m x n matrix."""
    r = min(m, n)
    full = 3 * m * n + m * n                         # grad, two moments; the starting copy
    factors = m * r + r + r * n                      # U, S, V (high and low parts)
    low = m * (r - k) + (r - k) + (r - k) * n        # trained: U_l, S_l, V_l
    osft = factors + 3 * low + m * n + m * n         # + their grads, two moments; W's grad; start
    return full * FLOAT, osft * FLOAT


def measure(m: int, n: int, fraction: float, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=g) / n ** 0.5
    G = torch.randn(m, n, generator=g) * 1e-3
    k = int(fraction * min(m, n))
    start = time.perf_counter()
    factors = Factors(W, k)
    svd = time.perf_counter() - start
    plain = torch.nn.Parameter(W.clone())
    plain_opt = torch.optim.AdamW([plain], lr=1e-5)
    osft_opt = torch.optim.AdamW(factors.params(), lr=1e-5)

    def full_step():
        plain.grad = G
        plain_opt.step()

    def osft_step():
        factors.take_gradient(G)
        osft_opt.step()
        factors.project()
        with torch.no_grad():
            W.copy_(factors.weight())

    full_step(), osft_step()  # the moments allocated
    full_bytes, osft_bytes = memory(m, n, k)
    return {"svd_s": svd, "full_step_s": best(full_step, repeats),
            "osft_step_s": best(osft_step, repeats), "full_bytes": full_bytes,
            "osft_bytes": osft_bytes, "weight_bytes": m * n * FLOAT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="t5-large,llama-2-7b")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from benchmarks.run import machine

    lines = ["| model | shape x count | SVD s (each) | step ms: AdamW on W / OSFT | OSFT step / AdamW "
             "| extra memory GiB: full FT / OSFT (whole model) |", "|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        totals = {"svd": 0.0, "full": 0.0, "osft": 0.0, "full_b": 0, "osft_b": 0}
        for (m, n), count in SHAPES[model].items():
            r = measure(m, n, args.fraction, args.repeats)
            totals["svd"] += count * r["svd_s"]
            totals["full"] += count * r["full_step_s"]
            totals["osft"] += count * r["osft_step_s"]
            totals["full_b"] += count * r["full_bytes"]
            totals["osft_b"] += count * r["osft_bytes"]
            lines.append(f"| {model} | {m}x{n} x {count} | {r['svd_s']:.2f} | "
                         f"{1e3 * r['full_step_s']:.1f} / {1e3 * r['osft_step_s']:.1f} | "
                         f"{r['osft_step_s'] / r['full_step_s']:.1f}x | "
                         f"{count * r['full_bytes'] / 2 ** 30:.2f} / "
                         f"{count * r['osft_bytes'] / 2 ** 30:.2f} |")
            print(lines[-1], flush=True)
        lines.append(f"| {model} | all targets | {totals['svd']:.0f} (per stage) | "
                     f"{1e3 * totals['full']:.0f} / {1e3 * totals['osft']:.0f} | "
                     f"{totals['osft'] / totals['full']:.1f}x | {totals['full_b'] / 2 ** 30:.1f} / "
                     f"{totals['osft_b'] / 2 ** 30:.1f} |")
        print(lines[-1], flush=True)
    text = (f"# OSFT's cost beside full fine-tuning\n\n`python benchmarks/osft_cost.py "
            f"{' '.join(sys.argv[1:])}` on {machine()}, {time.strftime('%Y-%m-%d')}; protected "
            f"share {args.fraction}; fp32; best of {args.repeats}.\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

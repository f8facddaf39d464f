"""The exact clipping norm (harness.grad_norm) against torch's `clip_grad_norm_`, the baseline it
replaced, measured in the same process on gradients of two shapes:

- LoRA r=8 on q and v of T5-large (72 attention modules: 144 pairs of 8x1024 and 1024x8);
- full fine-tuning of a T5-small-sized model (60M entries, as 6 tensors of 10M).

    python benchmarks/clip_norm.py [--repeats 5]

Prints one markdown row per shape: the best time of each and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.grad_norm import clip_


def shapes(name: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if name == "lora":
        return [torch.randn(*s, generator=g) * 1e-3 for _ in range(144) for s in ((8, 1024), (1024, 8))]
    return [torch.randn(10_000_000, generator=g) * 1e-3 for _ in range(6)]


def best(fn, grads, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        copies = [t.clone() for t in grads]
        start = time.perf_counter()
        fn(copies)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| gradient | entries | exact norm + clip | torch clip_grad_norm_ | ratio |")
    print("|---|---|---|---|---|")
    for name in ("lora", "full"):
        grads = shapes(name)
        params = [torch.nn.Parameter(torch.empty_like(t)) for t in grads]

        def baseline(copies):
            for p, c in zip(params, copies):
                p.grad = c
            torch.nn.utils.clip_grad_norm_(params, 1.0)

        ours = best(lambda copies: clip_(copies, 1.0), grads, args.repeats)
        theirs = best(baseline, grads, args.repeats)
        entries = sum(t.numel() for t in grads)
        print(f"| {name} | {entries / 1e6:.1f}M | {ours * 1e3:.1f} ms | {theirs * 1e3:.1f} ms | "
              f"{ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()

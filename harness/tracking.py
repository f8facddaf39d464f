"""Live curves of a run in the tracker its user already reads (`run --report-to tensorboard`).

One tracker run per harness run, written by rank 0 only, into the run's own folder
(`<run>/tensorboard/`), so `tensorboard --logdir RESULTS` shows every run of a sweep grouped by
profile, method, sequence and seed. What is logged:
- per optimizer step (`train/*`): the loss, the learning rate, the gradient norm before clipping,
  examples per second; the step count runs on across stages;
- per stage (`stage/*`, at the stage's last step): the accuracy of every task, AA over the tasks
  seen, and the seconds spent preparing, training, consolidating and evaluating;
- at the end (`final/*`, at the last step): the summary metrics and parameter metrics, the
  accuracy-matrix heatmap as an image, and the configuration and fingerprint as text.
A resumed run writes into the same folder from the first step of the stage it trains again: the
events a killed process wrote for that stage are dropped (`purge_step`), so the curves show each
step once. Tracking reads values the run computes anyway; it changes no result.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

TRACKERS = ("tensorboard",)


def parse_report_to(text: str) -> tuple[str, ...]:
    """`--report-to a,b`: known tracker names, or none."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise HarnessError(f"--report-to {text}: unknown tracker {', '.join(map(repr, unknown))} "
                           f"(known: {', '.join(TRACKERS)}, or none)")
    return names


class Tracking:
    """The tracker runs of one harness run; without trackers every call does nothing."""

    def __init__(self, writers: list):
        self.writers = writers

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for writer in self.writers:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    writer.add_scalar(f"{prefix}/{key}", value, step)

    def finish(self, summary, config: dict[str, Any], step: int) -> None:
        """The run's results: summary and parameter metrics, the heatmap, the configuration."""
        import numpy as np
        from PIL import Image

        from harness.plots import accuracy_heatmap

        final = {**summary.metrics, **{k: v for k, v in (summary.parameter_metrics or {}).items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        self.scalars("final", final, step)
        with tempfile.TemporaryDirectory() as tmp:
            png = next(p for p in accuracy_heatmap(summary, Path(tmp) / "R") if p.suffix == ".png")
            image = np.asarray(Image.open(png).convert("RGB"))
        for writer in self.writers:
            writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```",
                            step)
            writer.add_text("fingerprint", config["fingerprint"], step)
            writer.add_image("accuracy_matrix", image, step, dataformats="HWC")

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def open_tracking(names: tuple[str, ...], run_folder: Path, first_step: int) -> Tracking:
    """The trackers `names` for the run in `run_folder`, continuing from global step
    `first_step` (0 for a new run)."""
    writers = []
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter

        writers.append(SummaryWriter(log_dir=str(run_folder / "tensorboard"),
                                     purge_step=first_step + 1 if first_step else None))
    return Tracking(writers)

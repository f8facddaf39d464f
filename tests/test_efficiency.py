"""Every run's efficiency: training FLOPs counted once per batch shape, the device's peak, and
what a run's summary records of them."""

import copy
import json

import pytest
import torch

from harness import efficiency
from harness.cli import main
from harness.efficiency import PEAK_ENV, FlopMeter, device_peak, peak_from_environment
from harness.backbone import load_backbone
from harness.errors import HarnessError
from harness.testing.kit import at_second_stage, make_context
from harness.trainer import FitSettings, fit
from harness.textio import Batcher
from tests.test_causal import llama_dir  # noqa: F401 (the fixture)

IN, OUT = 4, 3


def linear_step(model, batch: int):
    x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(batch))
    model(x).sum().backward()


def test_each_shape_is_counted_once_and_every_step_adds_its_count(monkeypatch):
    entered = []

    class Counting(efficiency.FlopCount):
        def __enter__(self):
            entered.append(1)
            return super().__enter__()

    monkeypatch.setattr(efficiency, "FlopCount", Counting)
    monkeypatch.setattr(efficiency, "_counted", {})
    model = torch.nn.Linear(IN, OUT, bias=False)
    meter = FlopMeter(("test", "Linear", IN * OUT, IN * OUT))
    for batch in (5, 5, 7, 5, 7):
        with meter.step((batch,)):
            linear_step(model, batch)
    # Per step, the forward x W^T (2 B IN OUT) and the weight's gradient (2 B IN OUT); the input
    # needs none. A mistake that counted the forward only, or each shape once, gives 600 or 576.
    assert meter.total == 3 * (4 * 5 * IN * OUT) + 2 * (4 * 7 * IN * OUT)
    assert len(entered) == 2
    again = FlopMeter(meter.computation)  # a later stage or run of the process counts nothing new
    with again.step((5,)):
        linear_step(model, 5)
    assert again.total == 4 * 5 * IN * OUT and len(entered) == 2


def library_and_own_counts(model, batch) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for counter in (FlopCounterMode(display=False), efficiency.FlopCount()):
        model.zero_grad(set_to_none=True)
        with counter:
            model(**batch).loss.backward()
        counts.append(counter.get_total_flops() if isinstance(counter, FlopCounterMode)
                      else counter.total)
    return counts[0], counts[1]


def test_the_count_is_the_librarys_on_a_seq2seq_and_a_causal_step(synthetic_dir, llama_dir):
    # FlopCount applies torch.utils.flop_counter's formulas without its per-module sharing out:
    # the same total for a T5 with LoRA (forward, backward, attention) and a LLaMA.
    ctx, method, batcher = make_context(synthetic_dir, "seqlora", tasks=("agnews",), n_train=8)
    method.setup(ctx)
    batch = batcher.train_batch(["a b c d e", "f g"], ["x", "y z"])
    library, own = library_and_own_counts(ctx.model, batch)
    assert own == library > 0
    backbone = load_backbone(llama_dir)
    causal = Batcher(backbone, 512, 50).train_batch(["a b c d e", "f g"], ["x", "y z"])
    library, own = library_and_own_counts(backbone.model, causal)
    assert own == library > 0


class CountedAlready(dict):
    """Every (computation, shape) counted already, at 0 FLOPs: a fit that counts nothing."""

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return 0.0


def test_a_counted_fit_trains_what_an_uncounted_one_trains(synthetic_dir, monkeypatch):
    # The library's FlopCounterMode runs an operation it has no formula for through its
    # decomposition: GainLoRA's gate then took SiLU's gradient from Python's reference formula,
    # not the kernel, and a counted step trained other weights than a plain one.
    def trained(counted: dict):
        monkeypatch.setattr(efficiency, "_counted", counted)
        ctx, method, batcher = at_second_stage(synthetic_dir, "gainlora", n_train=16)
        result = fit(ctx, method, batcher, FitSettings(batch_size=8, epochs=1, seed=0,
                                                       progress=False))
        return result, {n: p.detach().clone() for n, p in ctx.model.named_parameters()
                        if p.requires_grad}

    counted, weights = trained({})
    plain, plain_weights = trained(CountedAlready())
    assert counted.flops > 0 and plain.flops == 0
    assert all(torch.equal(weights[n], plain_weights[n]) for n in weights)


def test_counting_changes_no_gradient(monkeypatch):
    monkeypatch.setattr(efficiency, "_counted", {})
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    counted = copy.deepcopy(plain)
    linear_input = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    plain(linear_input).square().sum().backward()
    with FlopMeter(("test", "mlp", 0, 0)).step((6,)):
        counted(linear_input).square().sum().backward()
    for a, b in zip(plain.parameters(), counted.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan", "1e400"])
def test_a_bad_peak_setting_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(PEAK_ENV, value)
    with pytest.raises(HarnessError, match=PEAK_ENV):
        peak_from_environment()


def test_the_peak_comes_from_the_setting_then_the_data_sheet(monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "312")
    assert device_peak(torch.device("cpu")).flops == 312e12
    monkeypatch.delenv(PEAK_ENV)
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA A10G", 70.0),
                         ("NVIDIA A10", 125.0), ("NVIDIA A100-SXM4-80GB", 312.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        peak = device_peak(torch.device("cuda"))
        assert peak.flops == tflops * 1e12 and name in peak.source
    cpu = device_peak(torch.device("cpu"))
    assert cpu.flops > 0 and cpu.source == "CPU: measured fp32 matmul"


def test_a_bad_peak_setting_stops_a_run_before_anything_is_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(PEAK_ENV, "fast")
    assert main(["run", "--method", "seqlora", "--order", "1", "--results",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {PEAK_ENV}='fast': must be a positive number of TFLOP/s"]
    assert not (tmp_path / "r").exists()


def test_a_run_records_its_flops_and_share_of_peak_per_stage(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "0.5")
    results = tmp_path / "r"
    assert main(["run", "--data-dir", str(synthetic_dir), "--results", str(results),
                 "--train-per-task", "32", "--test-per-task", "8", "--no-progress",
                 "--method", "seqlora", "--tasks", "agnews,SST-2"]) == 0
    run_dir = results / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0"
    stages = [json.loads((d / "metrics.json").read_text())["train"]
              for d in sorted(run_dir.glob("stage_0[1-9]*"))]
    summary = json.loads((run_dir / "summary.json").read_text())["efficiency"]
    assert len(stages) == 2 and all(t["flops"] > 0 and t["peak_source"] == PEAK_ENV for t in stages)
    for t in stages:
        assert t["share_of_peak"] == t["flops"] / t["seconds"] / 0.5e12
    assert summary["train_flops"] == sum(t["flops"] for t in stages)
    seconds = sum(t["seconds"] for t in stages)
    assert summary["share_of_peak"] == summary["train_flops"] / seconds / 0.5e12
    assert summary["stage_share_of_peak"] == [t["share_of_peak"] for t in stages]

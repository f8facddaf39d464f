"""The method plugin interface: a fixed training loop calls these hooks, and a method overrides
only the ones it needs. The engine (`harness/`) knows methods only through this class."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from harness.errors import HarnessError

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from harness.backbone import Backbone
    from harness.benchmark import Task
    from harness.data import TaskData
    from harness.profiles import Profile
    from harness.textio import Batcher


def penalty_terms(value: torch.Tensor | dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A `penalty` hook's value as named terms: none, {"penalty": value}, or the terms given."""
    if value is None:
        return {}
    return {"penalty": value} if isinstance(value, torch.Tensor) else dict(value)


@dataclass
class Context:
    """What a hook sees. `model` is the model being trained and evaluated; `setup` may replace it
    (for example with a peft-wrapped one)."""

    model: torch.nn.Module
    backbone: "Backbone"
    tasks: tuple["Task", ...]            # the task sequence of the run
    data: dict[str, "TaskData"]          # task name -> its data
    profile: "Profile"
    seed: int
    order: int | None = None             # the benchmark order, None for a custom sequence
    batcher: "Batcher | None" = None     # text -> model batches, the runner's
    stage: int = 0                       # 0-based index of the current task in `tasks`
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The rows of the micro-batch being trained (each a dict of `training_data`'s columns: source,
    # target and any a method adds, such as where a row comes from), set before each forward.
    batch_rows: list[dict] = field(default_factory=list)

    @property
    def task(self) -> "Task":
        return self.tasks[self.stage]

    @property
    def task_data(self) -> "TaskData":
        return self.data[self.task.name]


def stage_seed(ctx: Context, stage: int) -> int:
    """The seed of what a method draws at a stage (a new prompt, a memory batch, a perturbation,
    pseudo-examples): the run's seed and the stage, so that a resumed stage draws the same."""
    return ctx.seed * 1_000_003 + stage


class SettingError(HarnessError):
    """A bad value of one method setting; `key` names it, so that the caller can say where it was
    given (the method's config file or a `--set`)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key} {problem}")
        self.key = key


class Method:
    """Base class of every method plugin. Subclasses set `name` and override hooks.

    Hook order per run: `check` and `setup` once; then per stage (`stages` names them)
    `before_task`, `training_data`, `trainable_parameters`, `make_optimizer`, training steps
    (`step` wraps a closure that runs forward and backward, adding `penalty`; `after_step` follows
    the optimizer's step), `after_task`,
    `task_deltas`, `stage_metrics`; evaluation follows each stage (`select_for_eval`, `evaluates_as_before`).
    `state_dict`/`load_state_dict` carry what a resumed run needs beyond the model's tensors.
    """

    name: str = ""
    # How the tables show the method: its name in the published tables (matched for
    # --compare-published) and its row position in the paper layout (lower first). Read from the
    # class that declares them only, so a subclass registered under another name does not take
    # its parent's; a method without them follows the ranked ones, under its own name.
    paper_name: str = ""
    table_rank: float | None = None
    # The highest DeepSpeed ZeRO stage this method works under. ZeRO-1 partitions the optimizer
    # state across ranks, ZeRO-2 also the gradients (`.grad` is then empty after backward); a method
    # that reads whole gradients between passes or runs its own per-matrix optimizer sets 0, and the
    # harness refuses a higher stage with a clear message instead of training something else.
    max_zero_stage: int = 2
    # What `harness tune` searches besides the learning rate: the method's main coefficient,
    # setting -> (low, high), searched log-uniformly with the same trials as every other method
    # (over the integers when both bounds are integers).
    search_space: dict[str, tuple[float, float]] = {}

    def __init__(self, config: dict[str, Any] | None = None):
        """`config`: the method's hyperparameters for the profile (its config file, then `--set`).
        A subclass reads and checks each setting it uses here, so a bad value stops the run before
        anything is written, and declares here every attribute its hooks set.

        The two settings every optimizer reads are checked here: `lr`, a positive number, and
        `weight_decay`, a number >= 0. `lr` is required where this class's `make_optimizer` is
        used; a method with an optimizer of its own checks the other settings that one reads."""
        self.config = dict(config or {})
        if "lr" in self.config or type(self).make_optimizer is Method.make_optimizer:
            self.number("lr", above=0)
        self.number("weight_decay", 0.0, low=0)

    # -- reading settings (in __init__) -------------------------------------------------------
    # Each reads `self.config`, or `config` where a method keeps variants of it (per order).
    def choice(self, key: str, choices: tuple[str, ...], default: str,
               config: dict[str, Any] | None = None) -> str:
        value = (self.config if config is None else config).get(key, default)
        if value not in choices:
            raise SettingError(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def number(self, key: str, default: float | None = None, *, low: float | None = None,
               high: float | None = None, above: float | None = None, integer: bool = False,
               config: dict[str, Any] | None = None) -> Any:
        """A numeric setting within [low, high] (and > `above`); an int if `integer`."""
        value = (self.config if config is None else config).get(key, default)
        if value is None:
            raise SettingError(key, "is required")
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise SettingError(key, f"must be {kind}; got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high) or \
                (above is not None and not value > above):
            bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
                      f"<= {high}" if high is not None else ""]
            raise SettingError(key, f"must be {kind} {' and '.join(b for b in bounds if b)}; "
                                    f"got {value!r}")
        return int(value) if integer else float(value)

    def flag(self, key: str, default: bool, config: dict[str, Any] | None = None) -> bool:
        value = (self.config if config is None else config).get(key, default)
        if not isinstance(value, bool):
            raise SettingError(key, f"must be true or false; got {value!r}")
        return value

    def module_targets(self, key: str, config: dict[str, Any] | None = None) -> str | list[str] | None:
        """Which modules a setting selects, as peft reads LoRA targets: a regular expression over
        module names, or a list of name suffixes; None where the setting is absent."""
        value = (self.config if config is None else config).get(key)
        if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        if not isinstance(value, str):
            raise SettingError(key, f"must be a regular expression or a list of module names; "
                                    f"got {value!r}")
        try:
            re.compile(value)
        except re.error as exc:
            raise SettingError(key, f"is no regular expression ({exc}): {value!r}") from None
        return value

    def recorded_config(self) -> dict[str, Any]:
        """The settings a run records in its config (and its fingerprint)."""
        return self.config

    # -- structure ---------------------------------------------------------------------------
    def stages(self, ctx: Context) -> list[str]:
        """The run's training stages, by name: one per task of the sequence (the default), or, for
        a method trained once on the whole sequence, one stage named "all" (R then has one row
        after the base row, and every task is evaluated after it)."""
        return [task.name for task in ctx.tasks]

    def check(self, ctx: Context) -> None:
        """Refuse a backbone this method cannot train (a shape its terms need), before anything of
        the run is written: called once the model is loaded, before the run folder is claimed."""

    def setup(self, ctx: Context) -> None:
        """Wrap or prepare the backbone, once per run (before stage 0 is evaluated)."""

    def before_task(self, ctx: Context) -> None:
        """Prepare the stage: add a branch, freeze what must not move, snapshot a teacher."""

    def training_data(self, ctx: Context) -> "datasets.Dataset":
        """The examples to train on at this stage (columns `source`, `target`)."""
        return ctx.task_data.train

    def trainable_parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        return [p for p in ctx.model.parameters() if p.requires_grad]

    def make_optimizer(self, ctx: Context, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """A fresh optimizer per stage, as in the reference code (Adam moments reset per task).
        The fused AdamW (one kernel for every parameter instead of several per tensor) when every
        parameter is row-major: it pairs a parameter's entries with its moments' by memory order,
        and moments read back from a step checkpoint are row-major (the trainer gives gradients
        their parameter's layout, `harness.trainer.match_layouts`)."""
        return torch.optim.AdamW(params, lr=float(self.config["lr"]), betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=float(self.config.get("weight_decay", 0.0)),
                                 fused=all(p.is_contiguous() for p in params) or None)

    # -- the step ------------------------------------------------------------------------------
    def penalty(self, ctx: Context, batch: dict, outputs: Any
                ) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """Extra loss added to the task loss of every micro-batch: one tensor, named terms (each
        logged on its own by the trackers), or None for none. `ctx.batch_rows` holds the
        micro-batch's rows, for a term that reads a column of its own (which rows are replayed)."""
        return None

    def step(self, ctx: Context, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Leave in `.grad` the gradient the optimizer should apply; return the loss.

        `closure()` zeroes nothing: it runs forward and backward over the micro-batches of one
        optimizer step (task loss plus `penalty`) and returns their mean loss, adding to `.grad`.
        `closure(examples)` does the same over other (source, target) pairs, cut into micro-batches
        and shared among the ranks as a step's are (its gradient is their mean on every rank). Two-
        pass methods call it more than once: at other weights (SAM) or on other data (A-GEM).
        """
        return closure()

    def after_step(self, ctx: Context) -> None:
        """After each optimizer step: put the parameters back where the method constrains them (a
        projection onto a subspace), by the same in-place change on every rank."""

    def select_for_eval(self, ctx: Context, task: "Task | None") -> None:
        """Called before each task is evaluated (and with None after the last one): methods that
        keep a separate parametrisation per task (an oracle of task identity) switch to it here."""

    def evaluates_as_before(self, ctx: Context, task: "Task") -> bool:
        """True when, after the stage just trained, `task` is evaluated with exactly the weights
        it was evaluated with after the previous stage (or, after the first, the untouched base
        model): its accuracy and predictions are then carried over instead of generated again.
        Only for methods that guarantee it (a per-task adapter frozen since it was trained)."""
        return False

    # -- consolidation and reporting ----------------------------------------------------------------
    def after_task(self, ctx: Context) -> None:
        """Consolidate after training a stage (merge, Fisher, memory, buffer)."""

    def task_deltas(self, ctx: Context) -> dict[str, torch.Tensor]:
        """Per-task weight updates dW_t of the stage just trained, for the parameter metrics."""
        return {}

    def stage_metrics(self, ctx: Context) -> dict[str, float]:
        """Named numbers of the stage just trained that the method reports (how many steps it
        projected, how many examples it kept): they land under "method" in the stage's
        `metrics.json` and in the trackers as `stage/method/<name>`. Called after `after_task`.
        A count kept from step to step belongs in `fit_state` too, so a resumed stage reports it."""
        return {}

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Method state after a stage: tensors and JSON-able values (no pickling)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        """Rebuild the state (and any model structure) that `completed_stages` stages produced,
        so that the stage checkpoint's tensors can be loaded into `ctx.model`."""

    def fit_state(self) -> dict[str, Any]:
        """What the method changes from one training step to the next outside the model and the
        optimizer (a generator it draws from, a running count), for a step checkpoint: tensors
        and JSON-able values, nested in dicts and lists. What `before_task` sets up is not part of
        it: a resumed stage runs `before_task` again, under the same seed."""
        return {}

    def load_fit_state(self, state: dict[str, Any]) -> None:
        """Restore `fit_state` (after the stage's `before_task` and optimizer)."""

"""GainLoRA: gated integration of low-rank adaptation (InfLoRA's branches, each weighed per input).

Per task t: InfLoRA's branch (A_t designed from the task's input statistics inside the subspace
the GPM memory leaves free, frozen; B_t trained from zero) and a gate G_t that weighs the branch's
output per input sequence, in every layer of encoder and decoder:
- input of every gate: the mean of the encoder's input token embeddings over the padded length,
  x = (1/L) sum_l m_l e_l (m the attention mask; the reference divides by L, not by sum m);
- G_t: f_t(x) = SiLU(W2_t SiLU(W1_t x)) (W1_t: h x d, W2_t: d x h, no biases), a key k_t (d), and
  g_t(x) = |2 sigmoid(4 cos(f_t(x), k_t)) - 1|; the adapted layer computes W h + sum_i g_i(x) s B_i
  A_i h (s = alpha / r), the current branch gated too;
- only B_t, W1_t, W2_t and k_t train. W1_t and W2_t start as copies of G_{t-1}'s (G_1: torch's
  default Linear draw); k_t starts as the top left singular vector of (I - M2 M2^T) C3
  (C3 the second moment of f_t(x) over the task's training inputs), scaled to the norm of a
  uniform(-1, 1) draw;
- after every optimizer step (from the second task on) the gate is pulled back off the old tasks'
  features: W1 <- W1 - (W1 - W1_0) M0 M0^T, W2 <- W2 - (W2 - W2_0) M1 M1^T, k <- k - (k - k_0) M2
  M2^T (W_0 the values at the task's start), then every row rescaled to the norm it had after the
  step, so the new gate stays near zero on old tasks' inputs;
- after the task, GPM memories M0 (of x), M1 (of SiLU(W1 x)) and M2 (of f(x)) grow from the
  features' second moments over the training set, with the threshold eps_t = eps_lo + (eps_hi -
  eps_lo) t / T (the reference: 0.995 + 0.005 t / 15); the LoRA memory is InfLoRA's (`gpm`).
Inference runs every gate on every input: no task identity.

Causal models (the reference is T5 only): the gate reads the mean embedding of the prompt's
positions (label positions excluded while training; generation computes the gates on the prompt's
forward and keeps them for the tokens after it).

Reference: liangyanshuo/gainlora at a47edf4 (`src/t5_large.py`: gates and branch integration;
`src/cl_trainer_gainlora_inflora.py`: the memories, thresholds and the projection after each
step; `src/run_t5.py`: the gate copied from the previous task; its `gen_script_long_order*`
scripts: the hyperparameters).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness_methods.base import Context
from harness_methods.growth import branch_name
from harness_methods.inflora import InfLoRA, first_memory, update_memory
from harness_methods.lora import lora_layers, train_only

GATES = "gainlora_gates"  # the model's submodule holding the gates (names `<GATES>.task<k>.*`)


class Gate(nn.Module):
    """One task's gate: f(x) = SiLU(W2 SiLU(W1 x)) and the key k; g(x) = |2 sigmoid(4 cos(f(x), k)) - 1|."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.key = nn.Parameter(torch.empty(d).uniform_(-1, 1))

    def features(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.silu(self.w1(pooled))
        return hidden, F.silu(self.w2(hidden))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        similarity = F.cosine_similarity(self.features(pooled)[1], self.key[None], dim=-1)
        return (2 * torch.sigmoid(4 * similarity) - 1).abs()


def pooled_embeddings(embedding: nn.Module, input_ids: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """(batch, d): the masked sum of the input embeddings over the padded length, as the reference
    pools (dividing by L, the batch's padded length, not by the count of real tokens)."""
    embedded = embedding(input_ids).float()
    return (embedded * mask[..., None].float()).sum(1) / input_ids.shape[1]


def pool_prompt(embedding: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None,
                labels: torch.Tensor | None = None, seq2seq: bool = True) -> torch.Tensor:
    """A gate's input. An encoder's input: `pooled_embeddings`. A causal model's: the mean
    embedding of the prompt's real positions (while training, `labels` mark the answer's, left
    out), in training and generation alike; the reference's divisor, the padded length, would
    count the answer's positions in training only."""
    mask = torch.ones_like(input_ids) if mask is None else mask
    if seq2seq:
        return pooled_embeddings(embedding, input_ids, mask)
    prompt = mask.float()
    if labels is not None:
        if labels.shape[1] < input_ids.shape[1]:  # the harness's causal batches end every row
            # at the last column and give the labels of the last columns only
            pad = labels.new_full((labels.shape[0], input_ids.shape[1] - labels.shape[1]), -100)
            labels = torch.cat([pad, labels], dim=1)
        prompt = prompt * (labels == -100).float()
    total = (embedding(input_ids).float() * prompt[..., None]).sum(1)
    return total / prompt.sum(1, keepdim=True).clamp(min=1)


def project_off(new: torch.Tensor, start: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """The reference's step correction: new - (new - start) M M^T, each row then rescaled to the
    norm it had before the correction. `new` and `start` are (rows x d), `basis` M is d x r."""
    if basis is None or basis.shape[1] == 0:
        return new
    norms = new.norm(dim=-1, keepdim=True)
    corrected = new - (new - start) @ basis @ basis.T
    return corrected * norms / corrected.norm(dim=-1, keepdim=True).clamp(min=1e-30)


def second_moment(features: torch.Tensor) -> torch.Tensor:
    """Mean of v v^T over the rows v of `features` (n x d)."""
    return features.T @ features / max(1, features.shape[0])


class GainLoRA(InfLoRA):
    name = "gainlora"
    paper_name = "GainLoRA (InfLoRA)"  # the paper's row for the InfLoRA-based variant, this one
    table_rank = 8.5
    max_zero_stage = 0  # `after_step` rewrites the gate in place; ZeRO keeps its own master copy
    search_space = {"gate_eps_lo": (0.9, 0.999)}  # the gate memories' threshold

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.hidden = int(self.number("gate_hidden", 100, low=1))
        self.gate_eps_lo = self.number("gate_eps_lo", 0.995, low=0, high=1)
        self.gate_eps_hi = self.number("gate_eps_hi", 1.0, low=self.gate_eps_lo, high=1)
        self.gate_memory: list[torch.Tensor | None] = [None, None, None]  # M0, M1, M2
        self.start: dict[str, torch.Tensor] = {}  # the trained gate's values at the task's start
        self.gates: torch.Tensor | None = None    # (batch, branches) of the latest forward
        self.inputs: torch.Tensor | None = None   # the gate inputs x of the task's training set

    # -- growing a branch and its gate ---------------------------------------------------------
    def _grow(self, ctx: Context, stage: int) -> None:
        super()._grow(ctx, stage)
        if not hasattr(ctx.model, GATES):
            ctx.model.add_module(GATES, nn.ModuleDict())
            ctx.model.reads_whole_prompt = True  # no prompt-prefix cache: the gate reads it whole
            self._watch_inputs(ctx)
        gates = getattr(ctx.model, GATES)
        d = ctx.model.get_input_embeddings().embedding_dim
        gate = Gate(d, self.hidden).to(ctx.device)
        if stage > 0:  # the reference starts each gate from the previous task's
            previous = gates[branch_name(stage - 1)]
            gate.w1.load_state_dict(previous.w1.state_dict())
            gate.w2.load_state_dict(previous.w2.state_dict())
        gates[branch_name(stage)] = gate
        train_only(ctx.model, branch_name(stage))  # the newest branch and gate; the rest frozen
        index = len(self.branches) - 1
        for layer in lora_layers(ctx.model):
            layer.lora_B[branch_name(stage)].register_forward_hook(
                lambda module, args, out, i=index: out * self._gate_of(i, out))

    def _gate_of(self, index: int, out: torch.Tensor) -> torch.Tensor:
        return self.gates[:, index].to(out.dtype).view(-1, *([1] * (out.dim() - 1)))

    def _watch_inputs(self, ctx: Context) -> None:
        """Compute every gate once per input: on the encoder's call (T5: the decoder reuses them);
        on a causal model, on a forward over the whole prompt (the model's own call in training,
        its first call in generation) and not on the tokens generated after it."""
        embedding = ctx.model.get_input_embeddings()
        seq2seq = ctx.backbone.is_seq2seq

        def on_input(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length():
                return  # a generated token: the prompt's gates stay
            pooled = pool_prompt(embedding, kwargs["input_ids"], kwargs.get("attention_mask"),
                                 kwargs.get("labels"), seq2seq)
            self._set_gates(ctx, pooled)

        base = ctx.model.get_base_model()
        # peft calls the causal model's `forward` itself in training (no hook of it runs), and
        # generation calls the causal model, not peft's: one hook on each.
        watched = [base.get_encoder()] if seq2seq else [ctx.model, base]
        for module in watched:
            module.register_forward_pre_hook(on_input, with_kwargs=True)

    def _set_gates(self, ctx: Context, pooled: torch.Tensor) -> None:
        gates = getattr(ctx.model, GATES)
        self.gates = torch.stack([gates[name](pooled) for name in self.branches], dim=1)

    # -- the hooks -----------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)  # the branch, its gate, A_t designed and frozen
        gate = getattr(ctx.model, GATES)[branch_name(ctx.stage)]
        with torch.no_grad():
            self.inputs = self._task_inputs(ctx)  # the embedding is frozen: x stays as it is
            outputs = self._gate_features(gate)[2]
            C3 = second_moment(outputs)
            M2 = self.gate_memory[2]
            if M2 is not None:
                C3 = C3 - M2 @ (M2.T @ C3)
            U, _, _ = torch.linalg.svd(C3)
            gate.key.copy_((U[:, 0] * gate.key.norm()).to(gate.key.dtype))
        self.start = {n: p.detach().clone() for n, p in gate.named_parameters()}

    def after_step(self, ctx: Context) -> None:
        if ctx.stage == 0:
            return
        gate = getattr(ctx.model, GATES)[branch_name(ctx.stage)]
        M0, M1, M2 = self.gate_memory
        with torch.no_grad():
            gate.w1.weight.copy_(project_off(gate.w1.weight, self.start["w1.weight"], M0))
            gate.w2.weight.copy_(project_off(gate.w2.weight, self.start["w2.weight"], M1))
            gate.key.copy_(project_off(gate.key[None], self.start["key"][None], M2)[0])

    def after_task(self, ctx: Context) -> None:
        super().after_task(ctx)  # the LoRA memory
        gate = getattr(ctx.model, GATES)[branch_name(ctx.stage)]
        eps = self.gate_eps_lo + (self.gate_eps_hi - self.gate_eps_lo) * ctx.stage / len(ctx.tasks)
        with torch.no_grad():
            features = self._gate_features(gate)
        self.gate_memory = [
            (first_memory(second_moment(v), eps, dual=False)[0] if M is None
             else update_memory(M, "remove", second_moment(v), eps, dual=False)[0]
             ).contiguous().clone()
            for v, M in zip(features, self.gate_memory)]

    def _task_inputs(self, ctx: Context) -> torch.Tensor:
        """The gate input x of every training input of the task, one row each."""
        train, size = ctx.task_data.train, ctx.profile.eval_batch_size
        embedding = ctx.model.get_input_embeddings()
        pooled = []
        for start in range(0, len(train), size):
            rows = train[start:start + size]
            batch = ctx.batcher.train_batch(rows["source"], rows["target"])
            pooled.append(pool_prompt(embedding, batch["input_ids"], batch.get("attention_mask"),
                                      batch.get("labels"), ctx.backbone.is_seq2seq))
        return torch.cat(pooled)

    def _gate_features(self, gate: Gate) -> tuple[torch.Tensor, ...]:
        """(x, SiLU(W1 x), f(x)) for the task's training inputs, one row each."""
        hidden, out = gate.features(self.inputs)
        return self.inputs, hidden.float(), out.float()

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["gate_kinds"] = [M is not None for M in self.gate_memory]
        state.update({f"gate_memory{i}": M for i, M in enumerate(self.gate_memory) if M is not None})
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        super().load_state_dict(state, ctx, completed_stages)
        self.gate_memory = [state[f"gate_memory{i}"] if present else None
                            for i, present in enumerate(state["gate_kinds"])]



"""Group Relative Policy Optimization (DeepSeekMath, https://arxiv.org/abs/2402.03300), with the variants peers
ship: DAPO's clip-higher (https://arxiv.org/abs/2503.14476) and Dr. GRPO's unscaled advantages and constant
normaliser (https://arxiv.org/abs/2503.20783).

For G completions o_1..o_G of one prompt with rewards r_i, and token t of o_i:

    A_i      = (r_i - mean(r)) / (std(r) + eps)          scale_rewards: group (std with Bessel's correction)
             =  r_i - mean(r)                            scale_rewards: none (Dr. GRPO)
    ratio    = exp(log pi(t) - log pi_old(t))            pi_old: the policy that sampled the rollouts
    pg       = -min(ratio A_i, clip(ratio, 1 - clip_low, 1 + clip_high) A_i)
    kl       = exp(ref - log pi) - (ref - log pi) - 1    k3, ref = log pi_ref(t); left out when beta = 0
    loss     = sum over tokens of w(t) (pg + beta kl)

with the aggregation weights w over the N completions of the optimizer step (all micro-batches and ranks):

    token_mean            w = 1 / (tokens of all N completions)          (DAPO; TRL's default)
    seq_mean_token_mean   w = 1 / (N |o_i|)                              (the GRPO paper)
    dr_grpo               w = 1 / (N max_new_tokens)                     (Dr. GRPO)

The weights are computed on the host from the whole step's completions, so gradient accumulation and data
parallelism give the gradient of one step on the whole batch exactly. Log-probabilities are of
softmax(logits / temperature), the distribution the rollouts were sampled from.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from mindspore_llm.config_utils import require
from mindspore_llm.rl.rewards import RewardConfig

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")


@dataclass(kw_only=True)
class GRPOConfig:
    """The training YAML's ``grpo:`` section (``kind: grpo``)."""

    prompts: str  # jsonl of {"prompt" or "messages", "answer"}, relative to the YAML file
    tokenizer: str | None = None  # default: model.path
    template_kwargs: dict = field(default_factory=dict)  # extra chat-template variables, e.g. enable_thinking
    num_generations: int = 8  # G: rollouts per prompt, the group the advantages are relative to
    # the prompts are left-padded to the longest one of the data set, which must not exceed this
    max_prompt_length: int = 512
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int | None = None  # rollouts per generate call; null: all of a step's at once
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig(name="math_accuracy")])
    scale_rewards: Literal["group", "none"] = "group"
    advantage_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    beta: float = 0.04  # the KL coefficient; 0: no reference policy is computed at all
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "dr_grpo"] = "token_mean"
    ppo_epochs: int = 1  # optimizer steps on each batch of rollouts
    shuffle: bool = True
    log_rollouts: int = 8  # rollouts per step written to <logging dir>/rollouts/

    def validate(self) -> None:
        require(bool(self.prompts), "prompts: name a jsonl file of prompts with answers")
        require(self.num_generations >= 2, f"num_generations: must be >= 2 (advantages are relative to the group), "
                                           f"got {self.num_generations}")
        require(self.max_prompt_length >= 1, f"max_prompt_length: must be >= 1, got {self.max_prompt_length}")
        require(self.max_new_tokens >= 1, f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        require(self.temperature > 0, f"temperature: must be > 0 (rollouts are sampled), got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"top_k: must be >= 0 (0: off), got {self.top_k}")
        require(self.generation_batch_size is None or self.generation_batch_size >= 1,
                f"generation_batch_size: must be >= 1 or null, got {self.generation_batch_size}")
        require(len(self.rewards) > 0, "rewards: give at least one reward function")
        require(self.advantage_eps > 0, f"advantage_eps: must be positive, got {self.advantage_eps}")
        require(0 <= self.clip_low < 1, f"clip_low: must be in [0, 1), got {self.clip_low}")
        require(self.clip_high >= 0, f"clip_high: must be >= 0, got {self.clip_high}")
        require(self.beta >= 0, f"beta: must be >= 0, got {self.beta}")
        require(self.ppo_epochs >= 1, f"ppo_epochs: must be >= 1, got {self.ppo_epochs}")
        require(self.log_rollouts >= 0, f"log_rollouts: must be >= 0, got {self.log_rollouts}")


def group_advantages(rewards: np.ndarray, group_size: int, scale: str = "group", eps: float = 1e-6) -> np.ndarray:
    """A_i of every rollout; `rewards` (N,) holds the groups one after another."""
    grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = grouped - grouped.mean(1, keepdims=True)
    if scale == "group":
        centred = centred / (grouped.std(1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1).astype(np.float32)


def token_weights(completion_mask: np.ndarray, aggregation: str, max_new_tokens: int, sequences: int,
                  tokens: float) -> np.ndarray:
    """w (N, C) of this rank's completions (`completion_mask` 0/1), given the optimizer step's total `sequences`
    and completion `tokens` over every rank (module docstring)."""
    mask = completion_mask.astype(np.float64)
    if aggregation == "token_mean":
        weights = mask / max(tokens, 1.0)
    elif aggregation == "seq_mean_token_mean":
        weights = mask / (np.maximum(mask.sum(1, keepdims=True), 1.0) * sequences)
    elif aggregation == "dr_grpo":
        weights = mask / (sequences * max_new_tokens)
    else:
        raise ValueError(f"loss_aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
    return weights.astype(np.float32)


class CompletionLogProbs(nn.Cell):
    """``(input_ids, attention_mask, position_ids)`` of prompts left-padded to P slots followed by C completion
    slots -> (log-probability (b, C) of each completion token under softmax(logits / temperature), the entropy
    (b, C) of that distribution). Only the C positions that predict completion tokens reach the LM head."""

    def __init__(self, model, prompt_length: int, temperature: float):
        super().__init__(auto_prefix=False)
        self.model = model
        self.prompt_length = prompt_length
        self.temperature = temperature

    def construct(self, input_ids, attention_mask, position_ids):
        hidden = self.model.model(input_ids, attention_mask, position_ids)
        logits = self.model.head(hidden[:, self.prompt_length - 1:-1]) / self.temperature
        log_probs = ops.log_softmax(logits, -1)
        targets = input_ids[:, self.prompt_length:].astype(ms.int32).expand_dims(-1)
        picked = ops.gather_elements(log_probs, 2, targets).squeeze(-1)
        entropy = -(ops.exp(log_probs) * log_probs).sum(-1)
        return picked, entropy


class GRPOLoss(nn.Cell):
    """The differentiated function of one micro-batch: ``(input_ids, attention_mask, position_ids, old_log_probs,
    ref_log_probs, advantages, token_weights, multiplier) -> (loss x multiplier[0], statistics)``.

    Completion tensors are (b, C), advantages (b,); ``multiplier`` (b,) repeats the loss scale (batch-major, as
    the training step's multiplier). ``statistics`` (3,): the sums over counted tokens of the k3 KL, of the
    clipped-token indicator (ratio outside the clip range on the side where clipping stops the gradient) and of
    the entropy; not differentiated."""

    def __init__(self, model, config: GRPOConfig, prompt_length: int):
        super().__init__(auto_prefix=False)
        self.log_probs = CompletionLogProbs(model, prompt_length, config.temperature)
        self.low = 1.0 - config.clip_low
        self.high = 1.0 + config.clip_high
        self.beta = config.beta

    def construct(self, input_ids, attention_mask, position_ids, old_log_probs, ref_log_probs, advantages,
                  token_weights, multiplier):
        log_probs, entropy = self.log_probs(input_ids, attention_mask, position_ids)
        advantages = advantages.reshape(-1, 1)
        ratio = ops.exp(log_probs - old_log_probs)
        per_token = -ops.minimum(ratio * advantages, ops.clip(ratio, self.low, self.high) * advantages)
        counted = (token_weights > 0).astype(ms.float32)
        if self.beta > 0:
            delta = ref_log_probs - log_probs
            kl = ops.exp(delta) - delta - 1.0
            per_token = per_token + self.beta * kl
        else:  # no reference policy: ref_log_probs are placeholders
            kl = ops.zeros_like(log_probs)
        loss = (per_token * token_weights).sum()
        clipped = ops.logical_or(ops.logical_and(ratio < self.low, advantages < 0),
                                 ops.logical_and(ratio > self.high, advantages > 0)).astype(ms.float32)
        statistics = ops.stack([(kl * counted).sum(), (clipped * counted).sum(), (entropy * counted).sum()])
        return loss * multiplier[0], ops.stop_gradient(statistics)


@contextlib.contextmanager
def adapters_disabled(model):
    """The reference policy of a LoRA run: the frozen base, i.e. the same Cells with every adapter's scaling at
    0 (PEFT's ``disable_adapter()``), so no second copy of the model exists. A graph bakes the scaling in when it
    compiles: a cell compiled inside this context computes the base model on every later call too, and the
    policy's cells, compiled outside it, keep the adapters."""
    from mindspore_llm.lora import lora_layers

    adapted = list(lora_layers(model).values())
    scalings = [cell.scaling for cell in adapted]
    for cell in adapted:
        cell.scaling = 0.0
    try:
        yield model
    finally:
        for cell, scaling in zip(adapted, scalings):
            cell.scaling = scaling

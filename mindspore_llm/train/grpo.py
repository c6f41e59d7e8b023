"""``kind: grpo``: GRPO on the trainer's machinery (precision, plan, LoRA, checkpoints, resume, metrics).

One step of the run (``GRPOTrainer._run_step``):

    rollouts    the step's prompts, G slots each, through the KV-cache generator (sampled at grpo.temperature,
                seeded by (train.seed, step, row in the global batch): a resumed run samples what the
                uninterrupted one did, and data parallelism does not change the samples)
    rewards     the weighted sum of grpo.rewards per completion, then group-relative advantages
    reference   log pi_ref of every completion token when beta > 0: the base model with the adapters off (LoRA),
                else a frozen copy of model.path
    updates     grpo.ppo_epochs optimizer steps on the rollouts (``train.step.GRPOStep``: the GRPO loss of rl.grpo,
                accumulated over the micro-batches, then the training step's own unscale / clip / AdamW / loss
                scale), each against the rollout-time log-probabilities

The data stream is one of rollout slots (``PromptDataset``), so the trainer's batch arithmetic holds as for SFT:
micro_batch_size x gradient_accumulation_steps rollouts per rank and step, G of each prompt.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time

import mindspore as ms
import numpy as np

from mindspore_llm.common import ConfigError
from mindspore_llm.fileio import atomic_path
from mindspore_llm.generation import GenerationConfig, Generator, decode_completions, generate_all, position_ids
from mindspore_llm.models.moe import moe_blocks
from mindspore_llm.parallel.context import SEMI_AUTO
from mindspore_llm.rl.grpo import CompletionLogProbs, adapters_disabled, group_advantages, token_weights
from mindspore_llm.rl.prompts import PromptDataset, load_prompts
from mindspore_llm.rl.rewards import Rewards
from mindspore_llm.train.step import ROLLOUT_INPUTS
from mindspore_llm.train.trainer import Trainer

log = logging.getLogger("mindspore_llm")

ACCURACY_REWARDS = ("math_accuracy", "exact_match")  # 0/1 rewards whose mean is logged as `accuracy`


def check_rollout_parallelism(context) -> None:
    """Rollouts run on one model replica per process: stand-alone or data parallel."""
    if context.mode == SEMI_AUTO or context.pipeline_stages > 1:
        raise ConfigError("kind grpo: rollouts run stand-alone or data parallel (one model replica per process); "
                          "set parallel.model_parallel and pipeline_stages to 1")


class GRPOTrainer(Trainer):
    """The trainer for ``kind: grpo`` (``Trainer`` with its data, step and loop body replaced)."""

    curves = ("loss", "reward")

    @property
    def updates_per_step(self) -> int:
        return self.config.grpo.ppo_epochs

    def _build_dataset(self, dry_run: bool) -> PromptDataset:
        """The prompts (read for a dry run too: they set the compiled shapes)."""
        from mindspore_llm.data.dataset import open_tokenizer, shard_indices

        cfg, context = self.config.grpo, self.context
        check_rollout_parallelism(context)
        group = cfg.num_generations
        if self.rank_batch % group:
            raise ConfigError(f"train: micro_batch_size x gradient_accumulation_steps = {self.rank_batch} rollouts "
                              f"per rank and step must be a multiple of grpo.num_generations ({group}): whole "
                              f"groups")
        self.tokenizer = open_tokenizer(self.config.tokenizer)
        prompts = load_prompts(cfg.prompts, self.tokenizer, cfg.template_kwargs)
        longest = max(prompts, key=lambda p: len(p.ids))
        if len(longest.ids) > cfg.max_prompt_length:
            raise ConfigError(f"grpo.max_prompt_length: {longest.where} renders to {len(longest.ids)} tokens, more "
                              f"than {cfg.max_prompt_length}; raise it or shorten the prompt")
        self.prompt_length = len(longest.ids)
        rows = shard_indices(len(prompts), context.data_rank, context.data_world_size)
        return PromptDataset([prompts[i] for i in rows], group, cfg.shuffle, self.config.train.seed)

    def _build_step(self, trained):
        from mindspore_llm.generation import stop_token_ids
        from mindspore_llm.train.assembly import build_step

        config, cfg = self.config, self.config.grpo
        self.rewards = Rewards(cfg.rewards)
        generation_rows = cfg.generation_batch_size or self.rank_batch
        if self.rank_batch % generation_rows:
            raise ConfigError(f"grpo.generation_batch_size: {generation_rows} must divide the {self.rank_batch} "
                              f"rollouts of a step on a rank")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.generation = GenerationConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                           stop_token_ids(self.model_config, self.tokenizer, config.model["path"]),
                                           pad)
        self.generator = Generator(self.model, self.generation, generation_rows, self.prompt_length)
        self.reference_log_probs = self._reference() if cfg.beta > 0 else None
        return build_step(trained, self.model.trainable_params(), config, self.context, self.prompt_length)

    def _dry_run_inputs(self) -> list:
        """Random rollouts of the job's shapes (rank_batch rows of prompt_length + max_new_tokens tokens)."""
        from mindspore_llm.train.assembly import toy_rollouts

        rollouts = toy_rollouts(np.random.default_rng(0), self.rank_batch, self.prompt_length,
                                self.config.grpo, self.model_config.vocab_size)
        return [ms.Tensor(rollouts[name]) for name in ROLLOUT_INPUTS]

    def _reference(self) -> CompletionLogProbs:
        """log pi_ref: with LoRA the policy's own Cells with the adapters off (compiled so, see
        ``adapters_disabled``); else a frozen copy of the starting model."""
        if self.config.lora is not None:
            return CompletionLogProbs(self.model, self.prompt_length, self.config.grpo.temperature)
        from mindspore_llm.distill import freeze
        from mindspore_llm.models.auto import AutoModelForCausalLM
        from mindspore_llm.parallel.plan import apply_plan

        reference = freeze(AutoModelForCausalLM.from_pretrained(self.config.model["path"], "fp32",
                                                                self.config.precision.compute_dtype))
        apply_plan(reference, self.config.parallel)
        return CompletionLogProbs(reference, self.prompt_length, self.config.grpo.temperature)

    # -- one step -----------------------------------------------------------------------------------------------
    def _micro_batch_calls(self, cell, arrays, names):
        """`cell` on the rows of each micro-batch (the training step's shapes), outputs concatenated."""
        rows = self.config.train.micro_batch_size
        outputs = []
        for start in range(0, len(arrays[names[0]]), rows):
            outputs.append(cell(*[ms.Tensor(arrays[n][start:start + rows]) for n in names])[0].asnumpy())
        return np.concatenate(outputs)

    def _run_step(self, step: int, batch, stop_requested: bool) -> tuple[dict, bool]:
        cfg, context = self.config.grpo, self.context
        # seeded by the rollouts' place in the step's global batch: the same samples however the job is split
        generation = generate_all(self.generator, [p.ids for p in batch],
                                  seed=[self.config.train.seed, step], first_row=context.data_rank * self.rank_batch)
        completions = decode_completions(self.tokenizer, generation, self.generation.eos_token_id)
        scores = self.rewards.score([p.text for p in batch], completions, [p.answer for p in batch])
        rewards = self.rewards.total(scores)
        advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards, cfg.advantage_eps)
        mask = np.concatenate([generation.prompt_mask, generation.completion_mask], axis=1)
        arrays = {"input_ids": np.concatenate([generation.prompt_ids, generation.tokens], axis=1),
                  "attention_mask": mask, "position_ids": position_ids(mask),
                  "old_log_probs": generation.log_probs, "advantages": advantages}
        tick = time.perf_counter()
        if self.reference_log_probs is None:
            arrays["ref_log_probs"] = np.zeros_like(generation.log_probs)
        else:
            self.reference_log_probs.set_train(False)
            with adapters_disabled(self.model) if self.config.lora is not None else contextlib.nullcontext():
                arrays["ref_log_probs"] = self._micro_batch_calls(self.reference_log_probs, arrays,
                                                                  ("input_ids", "attention_mask", "position_ids"))
        reference_seconds = time.perf_counter() - tick
        if self.moe:  # DeepSeek's bias update balances the updates' tokens: forget those generation routed
            for _, block in moe_blocks(self.model):
                block.tokens_per_expert.set_data(ms.Tensor(np.zeros(block.tokens_per_expert.shape, np.float32)))
        # global counts (every rank's rollouts) for the aggregation weights, the metrics and the stop flag
        completion_tokens = generation.completion_mask.sum()
        sums = [len(batch), completion_tokens, rewards.sum(), (rewards ** 2).sum(), float(stop_requested)]
        sums += [scores[name].sum() for name in self.rewards.functions]
        sums += [(scores[name] ** 2).sum() for name in self.rewards.functions]
        totals = context.sum_over_ranks(np.array(sums, np.float64).astype(np.float32)).astype(np.float64)
        sequences, tokens = totals[0], totals[1]
        arrays["token_weights"] = token_weights(generation.completion_mask, cfg.loss_aggregation,
                                                cfg.max_new_tokens, int(sequences), float(tokens))
        inputs = [ms.Tensor(arrays[name]) for name in ROLLOUT_INPUTS]
        tick = time.perf_counter()
        self.step_cell.set_train(True)
        for _ in range(cfg.ppo_epochs):
            loss, grad_norm, overflow, loss_scale, statistics = self.compiled(*inputs)
        statistics = statistics.asnumpy() / max(tokens, 1.0)
        train_seconds = time.perf_counter() - tick
        trained_tokens = mask.sum() * cfg.ppo_epochs * context.data_parallel
        values = {
            "loss": float(loss.asnumpy()), "lr": self._current_lr(), "grad_norm": float(grad_norm.asnumpy()),
            "loss_scale": float(loss_scale.asnumpy()), "overflow": bool(overflow.asnumpy()),
            "reward": totals[2] / sequences, "reward_std": _std(totals[3], totals[2], sequences),
            "kl": float(statistics[0]), "clip_fraction": float(statistics[1]), "entropy": float(statistics[2]),
            "completion_length": tokens / sequences,
            "rollout_tokens_per_s": tokens / max(generation.seconds, 1e-9),
            "tokens_per_s": trained_tokens / max(train_seconds, 1e-9),
            "rollout_time_s": generation.seconds, "reference_time_s": reference_seconds,
            "train_time_s": train_seconds,
        }
        count = len(self.rewards.functions)
        for index, name in enumerate(self.rewards.functions):
            total, squares = totals[5 + index], totals[5 + count + index]
            values[f"reward/{name}/mean"] = total / sequences
            values[f"reward/{name}/std"] = _std(squares, total, sequences)
        accuracy = next((name for name in ACCURACY_REWARDS if name in self.rewards.functions), None)
        if accuracy is not None:
            values["accuracy"] = values[f"reward/{accuracy}/mean"]
        if context.is_main and cfg.log_rollouts:
            self._write_rollouts(step + 1, batch, completions, scores, rewards, advantages)
        return values, totals[4] > 0

    def _write_rollouts(self, step: int, batch, completions, scores, rewards, advantages) -> None:
        """The first grpo.log_rollouts rollouts of the step: <logging dir>/rollouts/step_NNNNNNNN.jsonl."""
        directory = self.config.logging_dir / "rollouts"
        directory.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(min(self.config.grpo.log_rollouts, len(batch))):
            lines.append(json.dumps({"prompt": batch[i].text, "completion": completions[i],
                                     "answer": batch[i].answer, "reward": float(rewards[i]),
                                     "advantage": float(advantages[i]),
                                     "rewards": {name: float(s[i]) for name, s in scores.items()}}))
        with atomic_path(directory / f"step_{step:08d}.jsonl") as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))


def _std(squares: float, total: float, count: float) -> float:
    return float(np.sqrt(max(squares / count - (total / count) ** 2, 0.0)))


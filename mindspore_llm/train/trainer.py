"""The training loop: build model, data, optimizer and the compiled step from a ``TrainConfig``, run it for the
configured steps, log every step, checkpoint every N, stop cleanly on SIGTERM/SIGINT, write the final model.

    trainer = Trainer(load_train_config("configs/tiny_qwen_sft.yaml"))
    result = trainer.run()          # result.first_loss, result.last_loss, result.final_model_dir

Resuming restores weights, AdamW state, loss scale and the data position, so the steps after a checkpoint
compute exactly what the uninterrupted run computed.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mindspore_llm.common import CheckpointError, ConfigError
from mindspore_llm.parallel.context import setup_parallel
from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import TrainConfig
from mindspore_llm.train.metrics import LossScaleWatch, MetricsLogger, Throughput, format_step
from mindspore_llm.train.schedule import learning_rate

log = logging.getLogger("mindspore_llm")

BATCH_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


@dataclass
class TrainResult:
    status: str  # "completed" or "interrupted"
    steps: int  # optimizer steps done in total (including those before a resume)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of the steps this run took
    checkpoint: Path | None = None
    final_model_dir: Path | None = None
    metrics_dir: Path | None = None
    seconds: float = 0.0
    adapter: bool = False  # final_model_dir is a PEFT LoRA adapter, not a whole model

    @property
    def first_loss(self) -> float:
        return self.losses[0][1]

    @property
    def last_loss(self) -> float:
        return self.losses[-1][1]

    def summary(self) -> str:
        lines = [f"training {self.status} at step {self.steps} in {self.seconds:.1f} s"]
        if self.losses:
            lines.append(f"  loss: {self.first_loss:.4f} (step {self.losses[0][0]}) -> {self.last_loss:.4f} "
                         f"(step {self.losses[-1][0]})")
        if self.checkpoint:
            lines.append(f"  last checkpoint: {self.checkpoint}  (continue with --resume)")
        if self.metrics_dir:
            lines.append(f"  metrics: {self.metrics_dir}")
        if self.final_model_dir and self.adapter:
            lines.append(f"  LoRA adapter (PEFT format): {self.final_model_dir}  (merge into the base model with "
                         f"`msllm-ckpt merge-lora`)")
        elif self.final_model_dir:
            lines.append(f"  model: {self.final_model_dir}  (load with AutoModelForCausalLM.from_pretrained, "
                         f"export with `msllm-ckpt ms2hf`)")
        return "\n".join(lines)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the step it is in, saves, and returns."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: finishing the current step, then saving a checkpoint",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        import mindspore as ms

        from mindspore_llm.checkpoint import load_weights
        from mindspore_llm.lora import apply_lora
        from mindspore_llm.models.auto import build_model
        from mindspore_llm.models.deepseek_v3 import moe_blocks
        from mindspore_llm.parallel.plan import apply_plan, validate_plan
        from mindspore_llm.train.optim import AdamW

        self.config = config
        self.context = setup_parallel(config.parallel, config.device_target)  # before any Tensor exists
        run = config.train
        micro_batches = self.context.micro_batch_num
        if self.context.pipeline_stages > 1:
            # the pipeline's micro-batches are the accumulation; the distillation teacher has no stages
            if run.gradient_accumulation_steps != 1:
                raise ConfigError(f"train.gradient_accumulation_steps: {run.gradient_accumulation_steps} with "
                                  f"pipeline stages; set it to 1 (parallel.micro_batch_num micro-batches accumulate)")
            if config.distill is not None:
                raise ConfigError("distill: distillation does not run with pipeline stages; set "
                                  "parallel.pipeline_stages: 1")
        self.global_batch = run.check_global_batch(self.context.data_parallel, micro_batches)
        # samples this rank feeds per step: its share, or (semi-auto, full batch) all of them
        self.rank_batch = (run.rank_batch_size(micro_batches) * self.context.data_parallel
                           // self.context.data_world_size)

        self.dataset = self._build_dataset()
        self.total_steps = run.total_steps(len(self.dataset) * self.context.data_world_size
                                           // self.context.data_parallel, micro_batches)
        if config.schedule_follows_run:  # the schedule counts optimizer updates
            config.schedule.total_steps = self.total_steps * self.updates_per_step
            try:
                config.schedule.validate()
            except ConfigError as err:
                raise ConfigError(f"schedule: {err} (total_steps is the run's length, "
                                  f"{config.schedule.total_steps} updates)")

        ms.set_seed(run.seed)
        self.rng = np.random.default_rng(run.seed)
        self.model_config = config.model_config()
        if config.lora is None:
            checkpointing.hf_config(self.model_config)  # the final config.json must be writable: fail now, not then
        if self.context.mode == "semi_auto_parallel":
            validate_plan(self.model_config, config.parallel, self.context.world_size, self.global_batch,
                          run.micro_batch_size, run.gradient_accumulation_steps, config.seq_length)
        self.model = build_model(self.model_config, config.precision.model_precision())
        if "path" in config.model:
            load_weights(self.model, config.model["path"])
            self.model.name_or_path = config.model["path"]
        if config.lora is not None:
            apply_lora(self.model, config.lora)
        self.applied_strategies = apply_plan(self.model, config.parallel)  # the adapters split like their bases
        # the model the step differentiates: the student with its frozen teacher (``teacher.*``, never
        # checkpointed: reloaded from distill.teacher at every start) or the model itself
        trained = self.model
        self.teacher_topk = None
        if config.distill is not None:
            from mindspore_llm.distill import DistillationModel, load_teacher

            teacher = None
            if config.distill.mode == "online":
                teacher = load_teacher(config.distill, self.model_config, config.data.tokenizer, "fp32",
                                       config.precision.compute_dtype)
                apply_plan(teacher, config.parallel)
            else:
                self.teacher_topk, self.teacher_rows = self._teacher_topk()
            trained = DistillationModel(self.model, config.distill, teacher)
        self.moe = bool(moe_blocks(self.model))
        optimizer = AdamW(self.model.trainable_params(), config.optimizer, config.schedule)
        self.step_cell = self._build_step(trained, optimizer)
        self.compiled = self.context.wrap_step(self.step_cell, config.checkpoint_dir / "strategy", config.parallel)

        self.start_step = 0
        self.resumed_from = self._resume(resume)

    # -- what a kind of training defines (``train/grpo.py`` defines them for kind grpo) ---------------------------
    updates_per_step = 1  # optimizer updates per step of the run
    curves = ("loss",)  # logged values drawn as <name>.png at the end

    def _build_dataset(self):
        """This rank's samples: ``len()`` and ``batches(rank_batch, start)``, resumable at any sample index."""
        from mindspore_llm.data.dataset import build_dataset

        return build_dataset(self.config.data, self.context.data_rank, self.context.data_world_size)

    def _build_step(self, trained, optimizer):
        from mindspore_llm.train.step import TrainStep

        config = self.config
        return TrainStep(trained, optimizer, config.precision, config.train.gradient_accumulation_steps,
                         config.optimizer.clip_grad_norm, self.context.grad_reducer(optimizer.parameters),
                         self.context.wrap_loss)

    def _run_step(self, step: int, batch, stop_requested: bool) -> tuple[dict, bool]:
        """Step `step` (counted from 0) on `batch`: (the values to log, whether any rank asked to stop)."""
        import mindspore as ms

        inputs = [ms.Tensor(batch[key]) for key in BATCH_KEYS]
        if self.teacher_topk is not None:  # the stored teacher logits of the batch's sequences
            positions = self.dataset.sample_positions(step * self.rank_batch, self.rank_batch)
            inputs += [ms.Tensor(a) for a in self.teacher_topk.rows(self.teacher_rows[positions])]
        tick = time.perf_counter()
        loss, grad_norm, overflow, loss_scale = self.compiled(*inputs)
        # loss summed over ranks for the mean; the stop flag summed so that every rank stops together
        reduced = self.context.sum_over_ranks(np.array([float(loss.asnumpy()), float(stop_requested)]))
        seconds = time.perf_counter() - tick
        values = {
            "loss": float(reduced[0]) / self.context.data_parallel
            if self.context.mode == "data_parallel" else float(reduced[0]),
            # the rate this update used (the optimizer's schedule, counted from 1)
            "lr": self._current_lr(),
            "grad_norm": float(grad_norm.asnumpy()),
            "loss_scale": float(loss_scale.asnumpy()),
            "overflow": bool(overflow.asnumpy()),
            "step_time_s": seconds,
            **self.throughput(seconds),
        }
        return values, reduced[1] > 0

    def _teacher_topk(self):
        """Offline distillation: the stored top-k file, and the file row of each of this rank's sequences (row r
        is data-set sequence r before sharding and shuffling, as `msllm distill-topk` wrote it)."""
        from mindspore_llm.data.dataset import shard_indices
        from mindspore_llm.distill import TeacherTopK

        cfg = self.config.distill
        topk = TeacherTopK(cfg.teacher_logits, cfg, self.model_config.vocab_size)
        rows = shard_indices(len(topk), self.context.data_rank, self.context.data_world_size)
        seq_length = topk.values.shape[1]
        if len(rows) != len(self.dataset) or seq_length != self.config.data.seq_length:
            raise ConfigError(f"distill.teacher_logits: {cfg.teacher_logits} holds {len(topk)} sequences of "
                              f"{seq_length} tokens, which does not match this data set (seq_length "
                              f"{self.config.data.seq_length}, {len(self.dataset)} sequences on this rank); write "
                              f"it with `msllm distill-topk` from this config")
        return topk, rows

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _resume(self, resume_flag: bool) -> Path | None:
        setting = "auto" if resume_flag else self.config.checkpoint.resume
        directory = self.config.checkpoint_dir
        if setting == "never":
            existing = checkpointing.latest_checkpoint(directory)
            if existing is not None:
                raise ConfigError(f"checkpoint.resume: {directory} already holds checkpoints (latest {existing.name});"
                                  f" continue with --resume, or set output_dir / checkpoint.dir to a new directory")
            return None
        path = checkpointing.latest_checkpoint(directory) if setting == "auto" else Path(setting)
        if path is None:
            log.info("no checkpoint in %s: starting from step 0", directory)
            return None
        state = checkpointing.load_checkpoint(path, self.step_cell, self.context.rank)
        if state["rank_batch"] != self.rank_batch or state["data_world_size"] != self.context.data_world_size:
            raise CheckpointError(
                f"{path}: written with {state['rank_batch']} samples per rank and step on "
                f"{state['data_world_size']} data shards; this job has {self.rank_batch} on "
                f"{self.context.data_world_size}, so the data position cannot be continued")
        self.start_step = state["step"]
        self.rng.bit_generator.state = state["rng_state"]
        log.info("resumed from %s: step %d, sample %d", path, self.start_step, state["sample_index"])
        return path

    def _trainer_state(self, step: int) -> dict:
        return {
            "sample_index": step * self.rank_batch,
            "rank_batch": self.rank_batch,
            "data_world_size": self.context.data_world_size,
            "seed": self.config.train.seed,
            "rng_state": self.rng.bit_generator.state,
            "config": self.config.to_dict(),
        }

    def save(self, step: int) -> Path | None:
        """This rank's part of checkpoint `step` (data-parallel replicas are identical: rank 0 writes)."""
        sharded = self.context.mode == "semi_auto_parallel"
        if not (sharded or self.context.is_main):
            return None
        return checkpointing.save_checkpoint(
            self.config.checkpoint_dir, step, self.step_cell, self._trainer_state(step), rank=self.context.rank,
            shards=self.context.world_size if sharded else 1, keep_last=self.config.checkpoint.keep_last)

    # -- the loop ---------------------------------------------------------------------------------------------
    def _throughput(self) -> Throughput:
        from mindspore_llm.flops import flops_per_token, peak_tflops

        peak = self.config.logging.peak_tflops
        return Throughput(
            tokens_per_step=self.global_batch * self.config.seq_length,
            world_size=self.context.world_size,
            flops_per_token=flops_per_token(self.model_config, self.config.seq_length),
            peak_tflops_per_device=peak_tflops(peak) if peak is not None else None)

    def run(self) -> TrainResult:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        config, main = self.config, self.context.is_main
        started = time.perf_counter()
        metrics = (MetricsLogger(config.logging_dir, config.logging.tensorboard, config.logging.plot,
                                 resume_step=self.start_step, curves=self.curves) if main else None)
        self.throughput = self._throughput()
        watch = LossScaleWatch() if config.precision.loss_scale == "dynamic" else None
        result = TrainResult("completed", self.start_step, metrics_dir=config.logging_dir if main else None)
        batches = self.dataset.batches(self.rank_batch, start=self.start_step * self.rank_batch)
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if (main and config.logging.progress_bar) else True)
        if main:
            log.info("training %s from step %d to %d: global batch %d (micro %d x accumulation %d x data-parallel "
                     "%d), seq_length %d", self.model_config.architecture, self.start_step, self.total_steps,
                     self.global_batch, config.train.micro_batch_size, config.train.gradient_accumulation_steps,
                     self.context.data_parallel, config.seq_length)
        step = self.start_step
        try:
            with StopRequest() as stop, logging_redirect_tqdm():  # log lines print above the bar
                while step < self.total_steps:
                    values, stopping = self._run_step(step, next(batches), stop.requested)
                    step += 1
                    if self.moe:
                        values.update(self._balance_experts())
                    result.losses.append((step, values["loss"]))
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
                    if main:
                        metrics.log(step, values)
                    if main and (step % config.logging.every_n_steps == 0 or step == self.total_steps):
                        log.info(format_step(step, self.total_steps, values))
                    if main and values["overflow"]:
                        log.warning("step %d: gradients overflowed (loss scale -> %g); the update was skipped",
                                    step, values["loss_scale"])
                    warning = watch.update(values["overflow"], values["loss_scale"]) if watch else None
                    if main and warning:
                        log.warning(warning)
                        metrics.log(step, {"warning": warning})
                    if stopping or step % config.checkpoint.every_n_steps == 0 or step == self.total_steps:
                        saved = self.save(step)
                        result.checkpoint = saved or result.checkpoint
                    if stopping:
                        result.status = "interrupted"
                        break
        finally:
            bar.close()
            result.steps = step
            result.seconds = time.perf_counter() - started
            if metrics is not None:
                metrics.close()
        if result.status == "completed" and main:
            if config.lora is not None:
                from mindspore_llm.peft import export_peft

                result.final_model_dir = export_peft(self.model, config.lora, config.final_model_dir,
                                                     overwrite=True)
                result.adapter = True
            else:
                result.final_model_dir = checkpointing.save_model_directory(
                    self.model, self.model_config, config.final_model_dir, config.tokenizer)
        return result

    def _balance_experts(self) -> dict[str, float]:
        """DeepSeek-V3 aux-loss-free balancing after the update: the expert-load statistics of the step's
        micro-batches (this rank's), then b_i += γ·sign(mean load - load_i) on the loads summed over the
        data-parallel ranks, so every replica moves its biases alike (semi-auto counts are global already)."""
        from mindspore_llm.models.deepseek_v3 import expert_load_stats, update_expert_bias

        stats = expert_load_stats(self.model)
        all_reduce = self.context.sum_over_ranks if self.context.mode == "data_parallel" else None
        update_expert_bias(self.model, all_reduce=all_reduce)
        return stats

    def _current_lr(self) -> float:
        """The rate of the last update, from the optimizer's own count (overflow-skipped steps do not count)."""
        updates = int(self.step_cell.optimizer.step.asnumpy())
        return learning_rate(max(updates, 1), self.config.schedule)

"""The training loop: build model, data, optimizer and the compiled step from a ``TrainConfig``, run it for the
configured steps, log every step, checkpoint every N, stop cleanly on SIGTERM/SIGINT, write the final model.

    trainer = Trainer(load_train_config("configs/tiny_qwen_sft.yaml"))
    result = trainer.run()          # result.first_loss, result.last_loss, result.final_model_dir

Resuming restores weights, AdamW state, loss scale and the data position, and randomness is a function of
(seed, step), so the steps after a checkpoint compute exactly what the uninterrupted run computed.

Weights flow per rank: the model is built without allocating its parameters; stand-alone and data parallel, each
then gets its full tensor from ``model.path``; under semi-auto parallel the step is compiled first (MindSpore cuts
and places every parameter), the compiled layouts are checked against the plan, and each rank reads only the
bytes of its own slices. Checkpoints hold each rank's slices; the final model is joined from them.
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
from mindspore_llm.lora import ADAPTER_SUFFIXES, set_dropout_key
from mindspore_llm.parallel.context import SEMI_AUTO, setup_parallel
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


def check_parallel_settings(config: TrainConfig, context) -> None:
    """What the parallel mode rules out, before anything is built."""
    run = config.train
    if context.pipeline_stages > 1:
        if run.gradient_accumulation_steps != 1:
            raise ConfigError(f"train.gradient_accumulation_steps: {run.gradient_accumulation_steps} with pipeline "
                              f"stages; set it to 1 (parallel.micro_batch_num micro-batches accumulate)")
        if config.distill is not None:
            # the teacher (online) and the distillation loss would need pipeline stages of their own
            raise ConfigError("distill: distillation (online or offline) does not run with pipeline stages; set "
                              "parallel.pipeline_stages: 1")
    elif context.mode == SEMI_AUTO and run.gradient_accumulation_steps != 1:
        # MindSpore's global-norm pass finds each gradient's square sum only along Mul/Cast/Depend: the in-graph
        # accumulation's Add would leave every device with its own partial norm (step.py, _square_sum)
        raise ConfigError(f"train.gradient_accumulation_steps: {run.gradient_accumulation_steps} under "
                          f"SEMI_AUTO_PARALLEL; set it to 1 and accumulate with pipeline stages and "
                          f"parallel.micro_batch_num, or a larger train.micro_batch_size")


class Trainer:
    """``Trainer(config).run()``; ``dry_run=True`` builds what the job compiles without its data, checkpoints or
    resume, for ``dry_run()``."""

    def __init__(self, config: TrainConfig, resume: bool = False, dry_run: bool = False):
        import mindspore as ms

        from mindspore_llm.checkpoint import load_weights
        from mindspore_llm.lora import apply_lora
        from mindspore_llm.models.auto import build_model, load_quantized
        from mindspore_llm.models.moe import moe_blocks
        from mindspore_llm.models.quantized import QuantizedWeight
        from mindspore_llm.models.naming import OURS, tensor_layout
        from mindspore_llm.parallel.plan import apply_plan, validate_plan
        from mindspore_llm.train.assembly import check_plan_structure

        self.config = config
        self.context = setup_parallel(config.parallel, config.device_target)  # before any Tensor exists
        run = config.train
        micro_batches = self.context.micro_batch_num
        check_parallel_settings(config, self.context)
        self.global_batch = run.check_global_batch(self.context.data_parallel, micro_batches)
        # samples this rank feeds per step: its share, or (semi-auto, full batch) all of them
        self.rank_batch = (run.rank_batch_size(micro_batches) * self.context.data_parallel
                           // self.context.data_world_size)

        self.dataset = self._build_dataset(dry_run)
        self.total_steps = (run.steps or 1) if dry_run else run.total_steps(
            len(self.dataset) * self.context.data_world_size // self.context.data_parallel, micro_batches)
        if config.schedule_follows_run:  # the schedule counts optimizer updates
            config.schedule.total_steps = self.total_steps * self.updates_per_step
            try:
                config.schedule.validate()
            except ConfigError as err:
                raise ConfigError(f"schedule: {err} (total_steps is the run's length, "
                                  f"{config.schedule.total_steps} updates)")

        ms.set_seed(run.seed)
        if self.context.world_size > 1 and not dry_run:
            checkpointing.check_shared_storage(self._checkpoint_dir(), self.context.rank, self.context.world_size)
        self.model_config = config.model_config()
        if config.lora is None:
            checkpointing.hf_config(self.model_config)  # the final config.json must be writable: fail now, not then
        quantization = config.lora.quantization if config.lora is not None else None
        self.sliced = self.context.mode == SEMI_AUTO
        if self.sliced:
            validate_plan(self.model_config, config.parallel, self.context.world_size, self.global_batch,
                          run.micro_batch_size, run.gradient_accumulation_steps, config.seq_length, quantization)
            if not dry_run:  # a dry run compiles the real graph, whose strategies MindSpore checks itself
                checked = check_plan_structure(config, self.context)  # minutes before the compile would say so
                log.info("op strategies: %d checked against the shapes a toy twin of the model sees", checked)
        precision = config.precision.model_precision()
        base_path = config.model.get("path")  # a model directory or a (training) checkpoint, in any naming
        if base_path is not None and quantization is not None:
            # QLoRA: the base is quantized as its checkpoint streams in (whole tensors, before compiling)
            self.model = load_quantized(base_path, precision, quantization, config.model.get("config"),
                                        config.model_layout())
        else:
            # no parameter is allocated here when weights are loaded or (semi-auto) cut at compile time
            self.model = build_model(self.model_config, precision, materialize=base_path is None and not self.sliced)
            if base_path is not None and not self.sliced:  # whole tensors, before compiling
                load_weights(self.model, self._base_weights())
        if base_path is not None:
            self.model.name_or_path = base_path
        self.base_shapes = {p.name: tuple(p.shape) for p in self.model.get_parameters()}
        trainable = {p.name for p in self.model.trainable_params()}
        if config.lora is not None:
            apply_lora(self.model, config.lora)  # quantizes an in-memory base first (lora.quantize_base)
        # a LoRA run on model.path saves what it trains; its frozen base (float, or quantized from it) is read from
        # model.path at every start
        self.frozen_base = frozenset()
        if config.lora is not None and base_path is not None:
            quantized = {p.name for _, cell in self.model.cells_and_names() if isinstance(cell, QuantizedWeight)
                         for p in cell.get_parameters()}
            self.frozen_base = frozenset((trainable | quantized) - {p.name for p in self.model.trainable_params()})
        self.full_shapes = {p.name: tuple(p.shape) for p in self.model.get_parameters()}
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
        self.trained = trained
        self.moe = bool(moe_blocks(self.model))
        self.step_cell, self.compiled = self._build_step(trained)
        if self.sliced and not dry_run:
            self._compile()
            if base_path is not None and quantization is None:
                self._load_slices()
        # the naming checkpoints are written in: ours, or mindformers' (checked now: the family must have it)
        self.naming = None
        if config.checkpoint.naming != OURS:
            if self.sliced:
                raise ConfigError(f"checkpoint.naming: {config.checkpoint.naming} needs whole tensors; under "
                                  f"semi-auto parallel each rank saves slices (keep mindspore_llm, then merge and "
                                  f"convert with msllm-ckpt merge-slices / hf2ms)")
            self.naming = tensor_layout(self.model_config, config.checkpoint.naming, config.checkpoint.layout,
                                        "checkpoint.naming")

        self.start_step = 0
        self.resumed_from = None if dry_run else self._resume(resume)
        if self.resumed_from is None and config.checkpoint.resume_optimizer and not dry_run:
            from mindspore_llm.train.interop import optimizer_state

            self.start_step = optimizer_state(config.model["path"], self.step_cell, self.model,
                                              config.model_layout(), "model.config")

    # -- what a kind of training defines (``train/grpo.py`` defines them for kind grpo) ---------------------------
    updates_per_step = 1  # optimizer updates per step of the run
    curves = ("loss",)  # logged values drawn as <name>.png at the end

    def _build_dataset(self, dry_run: bool):
        """This rank's samples: ``len()`` and ``batches(rank_batch, start)``, resumable at any sample index (None for
        a dry run, which reads no data)."""
        from mindspore_llm.data.dataset import build_dataset

        if dry_run:
            return None
        return build_dataset(self.config.data, self.context.data_rank, self.context.data_world_size)

    def _build_step(self, trained):
        """(the step cell, the cell to compile): ``assembly.build_step``, as ``msllm rehearse`` builds it."""
        from mindspore_llm.train.assembly import build_step

        return build_step(trained, self.model.trainable_params(), self.config, self.context)

    def _checkpoint_dir(self) -> Path:
        self.config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return self.config.checkpoint_dir

    def _strategy_dir(self) -> Path:
        return self.config.checkpoint_dir / "strategy"

    def _compile(self) -> None:
        """Semi-auto parallel: compile the step before any weight is read, so that MindSpore cuts and places
        every parameter (each rank allocates its slices only) and writes this rank's strategy file."""
        batch = next(self.dataset.batches(self.rank_batch, start=0))
        self.set_train(True)  # the phase the loop runs
        self.compiled.compile(*self._step_inputs(batch, 0))

    def _base_weights(self):
        """model.path as ``checkpoint.load_weights`` reads it: `msllm-ckpt shard` output by rank, any other
        checkpoint in any naming (``models.naming.checkpoint_reader``)."""
        from mindspore_llm.checkpoint import read_slices_manifest
        from mindspore_llm.models.naming import checkpoint_reader

        path = self.config.model["path"]
        if read_slices_manifest(path) is not None:
            return path
        return checkpoint_reader(path, self.model_config, self.config.model_layout(), "model.config")

    def _load_slices(self) -> None:
        """This rank's slices of the base weights, by the compiled layouts (checked against the plan's)."""
        from mindspore_llm.checkpoint import load_weights
        from mindspore_llm.checkpoint_slices import differing_layouts, read_strategy
        from mindspore_llm.parallel.plan import parameter_layouts

        rank = self.context.rank
        compiled = read_strategy(self._strategy_dir() / f"strategy_rank_{rank}.ckpt")
        planned = parameter_layouts(self.base_shapes.items(), self.config.parallel,
                                    self.model_config.num_hidden_layers, self.model_config.tie_word_embeddings)
        differences = differing_layouts(compiled, planned, self.base_shapes, rank)
        if differences:
            raise ConfigError("parallel: the compiled strategy cuts parameters differently from the plan "
                              "(mindspore_llm/parallel/plan.py):\n  " + "\n  ".join(differences[:20]))
        load_weights(self.model, self._base_weights(), compiled, rank, shapes=self.base_shapes)

    def _step_inputs(self, batch, step: int) -> list:
        import mindspore as ms

        inputs = [ms.Tensor(batch[key]) for key in BATCH_KEYS]
        if self.teacher_topk is not None:  # the stored teacher logits of the batch's sequences
            positions = self.dataset.sample_positions(step * self.rank_batch, self.rank_batch)
            inputs += [ms.Tensor(a) for a in self.teacher_topk.rows(self.teacher_rows[positions])]
        return inputs

    def _run_step(self, step: int, batch, stop_requested: bool) -> tuple[dict, bool]:
        """Step `step` (counted from 0) on `batch`: (the values to log, whether any rank asked to stop)."""
        inputs = self._step_inputs(batch, step)
        set_dropout_key(self.model, self.config.train.seed, step, self.context.data_rank)
        tick = time.perf_counter()
        loss, grad_norm, overflow, loss_scale = self.compiled(*inputs)
        # every rank learns the main rank's loss and whether any rank was asked to stop
        loss, stopping = self.context.step_report(float(loss.asnumpy()), stop_requested)
        seconds = time.perf_counter() - tick
        values = {
            "loss": loss,
            # the rate this update used (the optimizer's schedule, counted from 1)
            "lr": self._current_lr(),
            "grad_norm": float(grad_norm.asnumpy()),
            "loss_scale": float(loss_scale.asnumpy()),
            "overflow": bool(overflow.asnumpy()),
            "step_time_s": seconds,
            **self.throughput(seconds),
        }
        return values, stopping

    def _teacher_topk(self):
        """Offline distillation: the stored top-k file, and the file row of each of this rank's sequences (row r
        is data-set sequence r before sharding and shuffling, as `msllm distill-topk` wrote it)."""
        from mindspore_llm.data.dataset import shard_indices
        from mindspore_llm.distill import TeacherTopK

        cfg = self.config.distill
        topk = TeacherTopK(cfg.teacher_logits, cfg, self.model_config.vocab_size)
        rows = shard_indices(len(topk), self.context.data_rank, self.context.data_world_size)
        seq_length = topk.values.shape[1]
        sequences = len(rows) if self.dataset is None else len(self.dataset)  # a dry run reads no data
        if len(rows) != sequences or seq_length != self.config.data.seq_length:
            raise ConfigError(f"distill.teacher_logits: {cfg.teacher_logits} holds {len(topk)} sequences of "
                              f"{seq_length} tokens, which does not match this data set (seq_length "
                              f"{self.config.data.seq_length}, {sequences} sequences on this rank); write "
                              f"it with `msllm distill-topk` from this config")
        return topk, rows

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _resume(self, resume_flag: bool) -> Path | None:
        setting = "auto" if resume_flag else self.config.checkpoint.resume
        directory = self.config.checkpoint_dir
        if setting == "never":
            existing = checkpointing.list_checkpoints(directory)
            if existing:
                raise ConfigError(f"checkpoint.resume: {directory} already holds checkpoints (latest "
                                  f"{existing[-1].name}); continue with --resume, or set output_dir / checkpoint.dir "
                                  f"to a new directory")
            return None
        path = (checkpointing.latest_checkpoint(directory, self.context.rank) if setting == "auto"
                else Path(setting))
        if path is None:
            log.info("no checkpoint in %s: starting from step 0", directory)
            return None
        from mindspore_llm.train.interop import read_state

        state = checkpointing.load_checkpoint(  # ours, or written in mindformers' naming (checkpoint.naming)
            path, self.step_cell, self.context.rank, skip=self.frozen_base,
            read=None if self.naming is None else
            lambda file: read_state(file, self.step_cell, self.model, self.config.checkpoint.layout, str(file)))
        if state["rank_batch"] != self.rank_batch or state["data_world_size"] != self.context.data_world_size:
            raise CheckpointError(
                f"{path}: written with {state['rank_batch']} samples per rank and step on "
                f"{state['data_world_size']} data shards; this job has {self.rank_batch} on "
                f"{self.context.data_world_size}, so the data position cannot be continued")
        if state["seed"] != self.config.train.seed:
            raise CheckpointError(f"{path}: written with train.seed {state['seed']}, this job has "
                                  f"{self.config.train.seed}: its dropout masks and data order would differ")
        if state.get("base") != (self.model.name_or_path if self.frozen_base else None):
            raise CheckpointError(f"{path}: holds adapters trained on the base {state.get('base')!r}; this job's "
                                  f"model.path is {self.config.model.get('path')!r}")
        self.start_step = state["step"]
        log.info("resumed from %s: step %d, sample %d", path, self.start_step, state["sample_index"])
        return path

    def _trainer_state(self, step: int) -> dict:
        return {
            "sample_index": step * self.rank_batch,
            "rank_batch": self.rank_batch,
            "data_world_size": self.context.data_world_size,
            "seed": self.config.train.seed,
            "base": self.model.name_or_path if self.frozen_base else None,  # not saved: read from here
            "config": self.config.to_dict(),
        }

    def save(self, step: int) -> Path | None:
        """This rank's part of checkpoint `step` (data-parallel replicas are identical: rank 0 writes)."""
        if not (self.sliced or self.context.is_main):
            return None
        entries = None
        if self.naming is not None:
            from mindspore_llm.train.interop import epochs_begun, mindformers_entries

            entries = mindformers_entries(self.step_cell, self.model, self.naming, step=step,
                                          epoch=epochs_begun(step, len(self.dataset) // self.rank_batch),
                                          global_batch_size=self.global_batch)
        return checkpointing.save_checkpoint(
            self.config.checkpoint_dir, step, self.step_cell, self._trainer_state(step), rank=self.context.rank,
            shards=self.context.world_size if self.sliced else 1, keep_last=self.config.checkpoint.keep_last,
            skip=self.frozen_base, entries=entries)

    def export(self, checkpoint: Path | None) -> Path | None:
        """The final model (or PEFT adapter) directory: from the model in memory when it holds whole tensors;
        under semi-auto parallel joined from every rank's slices of the last checkpoint, by the main rank."""
        from mindspore_llm.peft import export_peft, write_adapter

        config = self.config
        if not self.context.is_main:
            return None
        if not self.sliced:
            if config.lora is not None:
                return export_peft(self.model, config.lora, config.final_model_dir, overwrite=True)
            return checkpointing.save_model_directory(self.model, self.model_config, config.final_model_dir,
                                                      config.tokenizer)
        checkpointing.wait_for_checkpoint(checkpoint)  # every rank's slices
        if config.lora is not None:
            shapes = {n: s for n, s in self.full_shapes.items() if n.endswith(ADAPTER_SUFFIXES)}
            adapters = checkpointing.adapters_from_slices(checkpoint, self._strategy_dir(), shapes)
            modules = {name for name, _ in self.model.cells_and_names()}
            return write_adapter(config.final_model_dir, config.lora, adapters, modules,
                                 getattr(self.model, "name_or_path", None), overwrite=True)
        weights = {p.name for p in self.model.weights()}
        return checkpointing.export_from_slices(
            checkpoint, self._strategy_dir(), self.model, self.model_config,
            {n: s for n, s in self.full_shapes.items() if n in weights}, config.final_model_dir, config.tokenizer)

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
        self.set_train(True)
        try:
            with StopRequest() as stop, logging_redirect_tqdm():  # log lines print above the bar
                while step < self.total_steps:
                    values, stopping = self._run_step(step, next(batches), stop.requested)
                    step += 1
                    if self.moe:
                        values.update(self._balance_experts(values["overflow"]))
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
                    if stopping:
                        log.info("rank %d: stopping after step %d (a stop was requested)", self.context.rank, step)
                    if stopping or step % config.checkpoint.every_n_steps == 0 or step == self.total_steps:
                        saved = self.save(step)
                        result.checkpoint = saved or result.checkpoint
                    if stopping:
                        result.status = "interrupted"
                        break
        finally:
            self.set_train(False)  # what follows (export, evaluation, generation) runs without dropout
            bar.close()
            result.steps = step
            result.seconds = time.perf_counter() - started
            if metrics is not None:
                metrics.close()
        if result.status == "completed":
            result.final_model_dir = self.export(result.checkpoint)
            result.adapter = config.lora is not None and result.final_model_dir is not None
        return result

    def set_train(self, mode: bool) -> None:
        """Training mode (dropout, e.g. LoRA's, acts) or evaluation mode for the step and the model; a distillation
        teacher always evaluates."""
        for cell in (self.compiled, self.step_cell):  # the compiled cell's phase picks the graph
            cell.set_train(mode)
        teacher = getattr(self.trained, "teacher", None)
        if teacher is not None:
            teacher.set_train(False)

    def _dry_run_inputs(self) -> list:
        """The step's inputs for a dry run: a random batch of the job's shapes."""
        import mindspore as ms

        from mindspore_llm.train.assembly import toy_batch

        vocab = self.model_config.vocab_size
        batch = toy_batch(np.random.default_rng(0), self.rank_batch, self.config.data.seq_length, vocab,
                          self.config.data)
        inputs = [ms.Tensor(batch[key]) for key in BATCH_KEYS]
        if self.teacher_topk is not None:
            rows = np.arange(self.rank_batch) % len(self.teacher_topk)
            inputs += [ms.Tensor(a) for a in self.teacher_topk.rows(rows)]
        return inputs

    def dry_run(self) -> str:
        """Compile this rank's step once on a batch of the job's shapes (MindSpore's simulation when launched by
        ``msllm train --dry-run``: the device is mocked, nothing executes) and say how it went."""
        import mindspore as ms

        inputs = self._dry_run_inputs()
        self.set_train(True)
        tick = time.perf_counter()
        self.compiled(*inputs)
        seconds = time.perf_counter() - tick
        gib = 2 ** 30
        return (f"dry run: rank {self.context.rank} of {self.context.world_size} ({self.context.description}) "
                f"compiled and ran one step in {seconds:.1f} s\n"
                f"  device memory (MindSpore's memory pool): peak allocated "
                f"{ms.runtime.max_memory_allocated() / gib:.2f} GiB, peak reserved "
                f"{ms.runtime.max_memory_reserved() / gib:.2f} GiB; per operator: run with GLOG_v=1 and look for "
                f"\"peak memory usage\"")

    def _balance_experts(self, overflowed: bool) -> dict[str, float]:
        """DeepSeek-V3 aux-loss-free balancing after the update: the expert-load statistics of the step's
        micro-batches (this rank's), then b_i += γ·sign(mean load - load_i) on the loads summed over the
        data-parallel ranks, so every replica moves its biases alike (semi-auto counts are global already);
        no bias update after an overflowed (skipped) step."""
        from mindspore_llm.models.moe import expert_load_stats, update_expert_bias

        stats = expert_load_stats(self.model)
        all_reduce = self.context.sum_over_ranks if self.context.mode == "data_parallel" else None
        update_expert_bias(self.model, all_reduce=all_reduce, overflowed=overflowed)
        return stats

    def _current_lr(self) -> float:
        """The rate of the last update, from the optimizer's own count (overflow-skipped steps do not count)."""
        updates = int(self.step_cell.optimizer.step.asnumpy())
        return learning_rate(max(updates, 1), self.config.schedule)

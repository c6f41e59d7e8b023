"""The training YAML: one typed section per concern, loaded with ``--set section.key=value`` overrides.

Paths of inputs (``model.path``, ``data.path``, ``data.tokenizer``) are relative to the YAML file, so a config
travels with its data; outputs (``output_dir``) are relative to the directory the job is started from.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict, load_yaml, require
from mindspore_llm.data.config import DataConfig
from mindspore_llm.distill import DistillConfig
from mindspore_llm.lora import LoraConfig
from mindspore_llm.models.kernels import select_kernels
from mindspore_llm.models.naming import LayoutOptions
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.memory import DTYPE_BYTES, PlanInputs, Workload
from mindspore_llm.rl.grpo import GRPOConfig
from mindspore_llm.train.optim import OptimizerConfig
from mindspore_llm.train.schedule import ScheduleConfig
from mindspore_llm.train.step import PrecisionConfig


@dataclass(kw_only=True)
class RunConfig:
    """How much to train and how the global batch is made: global = micro x accumulation x data-parallel ranks."""

    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # optional: when set, checked against micro_batch_size x gradient_accumulation_steps x data-parallel ranks
    global_batch_size: int | None = None
    steps: int | None = None  # exactly one of steps / epochs
    epochs: float | None = None
    seed: int = 42

    def validate(self) -> None:
        require(self.micro_batch_size >= 1, f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        require(self.gradient_accumulation_steps >= 1,
                f"gradient_accumulation_steps: must be >= 1, got {self.gradient_accumulation_steps}")
        require(self.global_batch_size is None or self.global_batch_size >= 1,
                f"global_batch_size: must be >= 1, got {self.global_batch_size}")
        require((self.steps is None) != (self.epochs is None), "steps / epochs: set exactly one of them")
        require(self.steps is None or self.steps >= 1, f"steps: must be >= 1, got {self.steps}")
        require(self.epochs is None or self.epochs > 0, f"epochs: must be positive, got {self.epochs}")

    def rank_batch_size(self, micro_batch_num: int = 1) -> int:
        """Samples one data-parallel replica consumes per optimizer step (x the pipeline's micro-batches)."""
        return self.micro_batch_size * self.gradient_accumulation_steps * micro_batch_num

    def check_global_batch(self, data_parallel: int, micro_batch_num: int = 1) -> int:
        global_batch = self.rank_batch_size(micro_batch_num) * data_parallel
        if self.global_batch_size is not None and self.global_batch_size != global_batch:
            pipeline = f" x parallel.micro_batch_num {micro_batch_num}" if micro_batch_num > 1 else ""
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} != micro_batch_size {self.micro_batch_size} x "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps}{pipeline} x data-parallel ranks "
                f"{data_parallel} = {global_batch}")
        return global_batch

    def total_steps(self, samples_per_rank: int, micro_batch_num: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        steps_per_epoch = samples_per_rank // self.rank_batch_size(micro_batch_num)
        if steps_per_epoch == 0:
            raise ConfigError(f"train.epochs: each rank holds {samples_per_rank} samples, fewer than one step's "
                              f"{self.rank_batch_size(micro_batch_num)}; lower micro_batch_size or "
                              f"gradient_accumulation_steps")
        return max(1, math.floor(self.epochs * steps_per_epoch))


# model.path: a model directory or checkpoint in any naming; model.config: its config.json (or directory) when it
# has none beside it (a mindformers checkpoint); model.layout: LayoutOptions for a mindformers mcore one
MODEL_PATH_KEYS = {"path", "config", "layout"}


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str | None = None  # default: <output_dir>/checkpoints
    every_n_steps: int = 100
    keep_last: int = 3
    # never: start fresh (an existing checkpoint directory with checkpoints is an error);
    # auto: continue from the latest complete checkpoint if there is one; or a checkpoint directory to start from
    resume: str = "never"
    # starting fresh from model.path, a training checkpoint in any naming (ours, mindformers'): continue its AdamW
    # moments, step and loss scale too, not only its weights
    resume_optimizer: bool = False
    # the naming train_state.ckpt is written in: ours, or mindformers' so that a mindformers job can take the run
    # over (mindformers: Qwen2/2.5; mindformers-mcore: Qwen3, DeepSeek-V3), with `layout`'s fused layouts
    naming: Literal["mindspore_llm", "mindformers", "mindformers-mcore"] = "mindspore_llm"
    layout: LayoutOptions = field(default_factory=LayoutOptions)

    def validate(self) -> None:
        require(self.every_n_steps >= 1, f"every_n_steps: must be >= 1, got {self.every_n_steps}")
        require(self.keep_last >= 1, f"keep_last: must be >= 1, got {self.keep_last}")
        require(bool(self.resume), "resume: 'never', 'auto' or a checkpoint directory")


@dataclass(kw_only=True)
class LoggingConfig:
    dir: str | None = None  # default: <output_dir>/logs
    every_n_steps: int = 1  # console lines; metrics.jsonl and TensorBoard get every step
    tensorboard: bool = True
    plot: bool = True
    progress_bar: bool = True
    # the device peak for MFU: a device type of mindspore_llm.flops.PEAK_TFLOPS ("910B") or TFLOPS per device;
    # null: model TFLOPS are logged, MFU is not
    peak_tflops: str | float | None = None

    def validate(self) -> None:
        from mindspore_llm.flops import peak_tflops

        require(self.every_n_steps >= 1, f"every_n_steps: must be >= 1, got {self.every_n_steps}")
        if self.peak_tflops is not None:
            try:
                require(peak_tflops(self.peak_tflops) > 0, f"peak_tflops: must be positive, got {self.peak_tflops}")
            except ValueError as err:
                raise ConfigError(f"peak_tflops: {err}") from None


@dataclass(kw_only=True)
class TrainConfig:
    # a model directory or checkpoint (`path:`, any naming; `config:`, `layout:`) or inline dimensions with
    # `architecture:`
    model: dict[str, Any]
    # lm: the next-token loss on `data:` (pretraining or SFT); grpo: reinforcement learning on the prompts and
    # rewards of `grpo:`, starting from the model at `model.path`
    kind: Literal["lm", "grpo"] = "lm"
    data: DataConfig | None = None  # kind lm
    grpo: GRPOConfig | None = None  # kind grpo
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig | None = None  # set: train adapters only, the base model frozen; the result is a PEFT adapter
    # set: distil a frozen teacher (`distill.teacher`, a model directory) into the model being trained
    distill: DistillConfig | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    device_target: Literal["CPU", "Ascend"] = "CPU"
    output_dir: str = "runs/train"
    # schedule.total_steps not given: the schedule spans the run (set by the trainer once the data is counted)
    schedule_follows_run: bool = field(default=False, init=False)

    def validate(self) -> None:
        require(bool(self.model), "model: give `path:` (a model directory) or inline dimensions with `architecture:`")
        if self.kind == "lm":
            require(self.data is not None, "data: kind lm trains on a data set; give the data section")
            require(self.grpo is None, "grpo: set kind: grpo to train with it")
        else:
            require(self.grpo is not None, "grpo: kind grpo needs the grpo section (prompts, rewards, ...)")
            require(self.data is None, "data: kind grpo reads its prompts from grpo.prompts; remove the data section")
            require("path" in self.model, "model.path: GRPO starts from a trained model directory")
            require(self.distill is None, "distill: does not combine with kind grpo")
        require(not self.checkpoint.resume_optimizer or "path" in self.model,
                "checkpoint.resume_optimizer: takes the optimizer state of model.path; give model.path (a training "
                "checkpoint)")
        if self.checkpoint.naming != "mindspore_llm":
            require(self.lora is None and self.distill is None,
                    f"checkpoint.naming: {self.checkpoint.naming} checkpoints hold a full model's training state; "
                    f"LoRA adapters and a distillation teacher have no place in them (use mindspore_llm)")

    @property
    def seq_length(self) -> int:
        """Tokens per training sequence: data.seq_length, or GRPO's prompt and completion slots."""
        if self.kind == "grpo":
            return self.grpo.max_prompt_length + self.grpo.max_new_tokens
        return self.data.seq_length

    @property
    def tokenizer(self) -> str:
        """The tokenizer directory or file (the final model directory gets a copy)."""
        if self.kind == "grpo":
            return self.grpo.tokenizer or self.model["path"]
        return self.data.tokenizer

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")

    @property
    def logging_dir(self) -> Path:
        return Path(self.logging.dir or Path(self.output_dir) / "logs")

    @property
    def final_model_dir(self) -> Path:
        return Path(self.output_dir) / "final"

    def model_config(self, source: str = "model"):
        """The family config: from the config.json of ``model.config`` or else ``model.path``, or from the inline
        dimensions."""
        from mindspore_llm.models.config import config_from_yaml_section, load_config

        if "path" in self.model:
            extra = sorted(set(self.model) - MODEL_PATH_KEYS)
            require(not extra, f"{source}: with `path:` only {', '.join(sorted(MODEL_PATH_KEYS - {'path'}))} may be "
                               f"given, got {', '.join(extra)}")
            self.model_layout(source)
            key = "config" if "config" in self.model else "path"
            if not Path(self.model[key]).exists():  # e.g. the SFT run a GRPO config starts from has not run yet
                raise ConfigError(f"{source}.{key}: {self.model[key]} does not exist; give a model directory or "
                                  f"checkpoint, or first run the job that writes it")
            return load_config(self.model[key])
        return config_from_yaml_section(self.model, source)

    def model_layout(self, source: str = "model") -> LayoutOptions:
        """How model.path lays out fused tensors where its names do not tell (a mindformers mcore checkpoint)."""
        return from_dict(LayoutOptions, self.model.get("layout") or {}, f"{source}.layout")

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as a YAML-able mapping (what a checkpoint records)."""
        data = dataclasses.asdict(self)
        data.pop("schedule_follows_run")
        return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as a YAML scalar: 3, 1e-4, true, null, fp16)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {value!r} is not valid YAML ({err})") from None
    if isinstance(parsed, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string; on the command line it is meant as a number
            parsed = float(parsed)
        except ValueError:
            pass
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: {'.'.join(keys[:depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _resolve_input_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    model = raw.get("model")
    if isinstance(model, dict):
        for key in ("path", "config"):
            if isinstance(model.get(key), str):
                model[key] = str(base / model[key])
    for section, keys in (("distill", ("teacher", "teacher_logits")), ("grpo", ("prompts", "tokenizer"))):
        values = raw.get(section)
        if isinstance(values, dict):
            for key in keys:
                if isinstance(values.get(key), str):
                    values[key] = str(base / values[key])
    return raw


def train_config_from_dict(raw: dict[str, Any], source: str, base_dir: str | Path = ".") -> TrainConfig:
    """Typed config from a YAML mapping; relative input paths are taken relative to `base_dir`."""
    base = Path(base_dir).resolve()
    config = from_dict(TrainConfig, _resolve_input_paths(copy.deepcopy(raw), base), source)
    config.schedule_follows_run = "total_steps" not in (raw.get("schedule") or {})
    if config.data is not None:
        config.data = config.data.resolve_paths(base)
    config.model_config(f"{source}: model")  # the model section's errors surface before anything starts
    return config


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    path = Path(path)
    raw = apply_overrides(load_yaml(path), list(overrides))
    return train_config_from_dict(raw, str(path), path.parent)


def plan_inputs(config: TrainConfig, source: str) -> PlanInputs:
    """What the memory planner needs from a training config: plain numbers and the family configs."""
    precision, run = config.precision, config.train
    kernels = select_kernels(config.device_target)
    work = Workload(config.seq_length, run.micro_batch_size, DTYPE_BYTES[precision.compute_dtype],
                    DTYPE_BYTES["fp32"] if precision.level == "O1" else None, kernels.flash_attention)
    distill = config.distill
    from mindspore_llm.models.config import load_config

    teacher = load_config(distill.teacher) if distill is not None and distill.mode == "online" else None
    return PlanInputs(source, config.model_config(f"{source}: model"), config.parallel, work,
                      run.global_batch_size, run.micro_batch_size, run.gradient_accumulation_steps, config.lora,
                      distill, teacher, kernels, config.grpo)


def load_plan_inputs(path: str | Path, overrides: list[str] = ()) -> PlanInputs:
    """The plan of the training YAML at `path` with `overrides` (``section.key=value``; its data files need not
    exist: only the shapes are read)."""
    return plan_inputs(load_train_config(path, overrides), str(path))

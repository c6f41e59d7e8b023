"""Hugging Face ``architectures`` names -> (config class, builder), and ``AutoModelForCausalLM``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from mindspore_llm.checkpoint import load_weights
from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict, read_text
from mindspore_llm.models import deepseek_v3, qwen
from mindspore_llm.models.layers import CausalLM, Precision
from mindspore_llm.models.naming import LayoutOptions, checkpoint_tensors

# architecture name -> (config class with from_hf, builder(config, precision) -> CausalLM)
REGISTRY: dict[str, tuple[type, Callable[..., CausalLM]]] = {
    **{name: (qwen.QwenConfig, qwen.build_qwen) for name in qwen.ARCHITECTURES},
    **{name: (deepseek_v3.DeepseekV3Config, deepseek_v3.build_deepseek_v3) for name in deepseek_v3.ARCHITECTURES},
}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json"):
    architecture = (hf.get("architectures") or [None])[0]
    if architecture not in REGISTRY:
        raise ConfigError(f"{source}: architectures {hf.get('architectures')!r} is not supported; "
                          f"supported: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[architecture][0].from_hf(hf, source)


def config_from_yaml_section(section: Mapping[str, Any], source: str):
    """A YAML ``model:`` section with inline dimensions; ``architecture`` picks the family."""
    architecture = section.get("architecture")
    if architecture not in REGISTRY:
        raise ConfigError(f"{source}.architecture: {architecture!r} is not one of {', '.join(sorted(REGISTRY))}")
    return from_dict(REGISTRY[architecture][0], section, source)


def read_hf_config(path: str | os.PathLike, hint: str = "") -> tuple[dict[str, Any], Path]:
    """(the ``config.json`` dict, its file) of a model directory or a ``config.json`` path."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    text = read_text(file, hint=hint)
    try:
        return json.loads(text), file
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: invalid JSON ({err})") from None


def load_config(path: str | os.PathLike):
    """Config from a model directory or a ``config.json`` path."""
    hf, file = read_hf_config(path)
    return config_from_hf(hf, str(file))


def build_model(config, precision: Precision | None = None) -> CausalLM:
    """Randomly initialised model for `config` (default precision: fp32, the device target's kernels). How it is
    split is not its business: a parallel job's caller applies ``mindspore_llm.parallel.plan.apply_plan`` to it."""
    return REGISTRY[config.architecture][1](config, Precision() if precision is None else precision)


class AutoModelForCausalLM:
    """``AutoModelForCausalLM.from_pretrained(path)`` for a Hugging Face directory (config.json + safetensors),
    a directory written by ``msllm-ckpt hf2ms``, or any MindSpore checkpoint file or directory in any naming
    (ours, mindformers 1.x, mindformers mcore: ``mindspore_llm.models.naming``) with ``config=`` the model's
    config.json when it has none beside it."""

    @staticmethod
    def from_config(config, param_dtype: str = "fp32", compute_dtype: str = "fp32") -> CausalLM:
        return build_model(config, Precision.from_names(param_dtype, compute_dtype))

    @staticmethod
    def from_pretrained(path: str | os.PathLike, param_dtype: str = "fp32", compute_dtype: str = "fp32",
                        config: str | os.PathLike | None = None, layout: LayoutOptions = LayoutOptions()) -> CausalLM:
        """`layout`: how a mindformers mcore checkpoint lays out its fused tensors where the names do not tell."""
        config_file = read_hf_config(path if config is None else config)[1]
        model = AutoModelForCausalLM.from_config(load_config(config_file), param_dtype, compute_dtype)
        load_weights(model, path, checkpoint_tensors(path, model.config, layout, str(config_file)))
        model.name_or_path = str(path)
        return model

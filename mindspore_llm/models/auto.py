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


def build_model(config, precision: Precision = Precision(), materialize: bool = True) -> CausalLM:
    """The model for `config`, randomly initialised; with ``materialize=False`` its parameters are declared
    (name, shape, dtype, initializer) but hold no memory until loaded (``checkpoint.load_weights`` gives each its
    full tensor or this rank's slice) or initialised (``init_parameters_data``, or the first compile).

    How it is split is not its business: a parallel job's caller applies ``parallel.plan.apply_plan`` to it."""
    from mindspore.nn.utils import no_init_parameters

    if materialize:
        return REGISTRY[config.architecture][1](config, precision)
    with no_init_parameters():
        return REGISTRY[config.architecture][1](config, precision)


class AutoModelForCausalLM:
    """``AutoModelForCausalLM.from_pretrained(path)`` for a Hugging Face directory (config.json + safetensors)
    or a directory written by ``msllm-ckpt hf2ms``."""

    @staticmethod
    def from_config(config, param_dtype: str = "fp32", compute_dtype: str = "fp32",
                    materialize: bool = True) -> CausalLM:
        return build_model(config, Precision.from_names(param_dtype, compute_dtype), materialize)

    @staticmethod
    def from_pretrained(path: str | os.PathLike, param_dtype: str = "fp32", compute_dtype: str = "fp32") -> CausalLM:
        """Built without allocating random weights, then filled from `path`: the model is in memory once."""
        model = AutoModelForCausalLM.from_config(load_config(path), param_dtype, compute_dtype, materialize=False)
        load_weights(model, path)
        model.name_or_path = str(path)
        return model

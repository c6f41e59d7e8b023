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
from mindspore_llm.models.quantized import quantize_model, quantizing_tensors
from mindspore_llm.quant import QuantizationConfig, read_hf_quantization

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


def build_model(config, precision: Precision = Precision()) -> CausalLM:
    """Randomly initialised model for `config`. How it is split is not its business: a parallel job's caller
    applies ``mindspore_llm.parallel.plan.apply_plan`` to it."""
    return REGISTRY[config.architecture][1](config, precision)


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
                        config: str | os.PathLike | None = None, layout: LayoutOptions = LayoutOptions(),
                        quantization: str | QuantizationConfig | None = None) -> CausalLM:
        """`layout`: how a mindformers mcore checkpoint lays out its fused tensors where the names do not tell.
        `quantization` ("nf4", "int8" or a ``QuantizationConfig``): hold the weight of every linear layer
        quantized (``models/quantized.py``), quantized tensor by tensor as the checkpoint is read. A checkpoint
        saved quantized (``msllm-ckpt quantize``, or transformers with bitsandbytes) loads quantized by itself."""
        config_file = read_hf_config(path if config is None else config)[1]
        if quantization is not None or _saved_quantization(config_file) is not None:
            return load_quantized(path, Precision.from_names(param_dtype, compute_dtype), quantization, config_file,
                                  layout)
        model = AutoModelForCausalLM.from_config(load_config(config_file), param_dtype, compute_dtype)
        load_weights(model, path, checkpoint_tensors(path, model.config, layout, str(config_file)))
        model.name_or_path = str(path)
        return model


def _saved_quantization(config_file: str | os.PathLike) -> QuantizationConfig | None:
    hf, file = read_hf_config(config_file)
    return read_hf_quantization(hf, str(file))


def load_quantized(path: str | os.PathLike, precision: Precision = Precision(),
                   quantization: str | QuantizationConfig | None = None, config: str | os.PathLike | None = None,
                   layout: LayoutOptions = LayoutOptions()) -> CausalLM:
    """The model of checkpoint `path` (any naming; `config` its config.json when none is beside it) with its linear
    weights quantized as they stream in, never all in float: built without allocating its parameters, each float
    linear weight quantized once read. `quantization` None: as the checkpoint was saved quantized."""
    from mindspore.nn.utils import no_init_parameters

    config_file = read_hf_config(path if config is None else config)[1]
    saved = _saved_quantization(config_file)
    held = QuantizationConfig.of(quantization) if quantization is not None else saved
    if saved is not None and held != saved:
        raise ConfigError(f"{path}: saved quantized as {saved}; it cannot be loaded as {held}")
    with no_init_parameters():
        model = build_model(load_config(config_file), precision)
    quantize_model(model, held, from_weights=False)
    tensors = checkpoint_tensors(path, model.config, layout, str(config_file))
    load_weights(model, path, quantizing_tensors(model, tensors, prequantized=saved is not None))
    model.name_or_path = str(path)
    return model

"""Hugging Face ``architectures`` names -> model builders, and ``AutoModelForCausalLM``."""
from __future__ import annotations

import os
from typing import Callable

from mindspore_llm.checkpoint import load_weights
from mindspore_llm.common import ConfigError
from mindspore_llm.models import deepseek_v3, qwen
from mindspore_llm.models.config import load_config, read_hf_config
from mindspore_llm.models.layers import CausalLM, Precision
from mindspore_llm.models.naming import LayoutOptions, checkpoint_reader
from mindspore_llm.models.quantized import QuantizingReader, quantize_model
from mindspore_llm.quant import QuantizationConfig, read_hf_quantization

# architecture name -> builder(config, precision) -> CausalLM (config classes: config.CONFIGS)
BUILDERS: dict[str, Callable[..., CausalLM]] = {
    **{name: qwen.build_qwen for name in qwen.QwenConfig.HF_MODEL_TYPES},
    **{name: deepseek_v3.build_deepseek_v3 for name in deepseek_v3.DeepseekV3Config.HF_MODEL_TYPES},
}


def build_model(config, precision: Precision | None = None, materialize: bool = True) -> CausalLM:
    """The model for `config`, randomly initialised (default precision: fp32, the device target's kernels); with
    ``materialize=False`` its parameters are declared (name, shape, dtype, initializer) but hold no memory until
    loaded (``checkpoint.load_weights`` gives each its full tensor or this rank's slice) or initialised
    (``init_parameters_data``, or the first compile).

    How it is split is not its business: a parallel job's caller applies ``parallel.plan.apply_plan`` to it."""
    from mindspore.nn.utils import no_init_parameters

    build, precision = BUILDERS[config.architecture], Precision() if precision is None else precision
    if materialize:
        return build(config, precision)
    with no_init_parameters():
        return build(config, precision)


class AutoModelForCausalLM:
    """``AutoModelForCausalLM.from_pretrained(path)`` for a Hugging Face directory (config.json + safetensors),
    a directory written by ``msllm-ckpt hf2ms``, or any MindSpore checkpoint file or directory in any naming
    (ours, mindformers 1.x, mindformers mcore: ``mindspore_llm.models.naming``) with ``config=`` the model's
    config.json when it has none beside it."""

    @staticmethod
    def from_config(config, param_dtype: str = "fp32", compute_dtype: str = "fp32",
                    materialize: bool = True) -> CausalLM:
        return build_model(config, Precision.from_names(param_dtype, compute_dtype), materialize)

    @staticmethod
    def from_pretrained(path: str | os.PathLike, param_dtype: str = "fp32", compute_dtype: str = "fp32",
                        config: str | os.PathLike | None = None, layout: LayoutOptions = LayoutOptions(),
                        quantization: str | QuantizationConfig | None = None) -> CausalLM:
        """`layout`: how a mindformers mcore checkpoint lays out its fused tensors where the names do not tell.
        `quantization` ("nf4", "int8" or a ``QuantizationConfig``): hold the weight of every linear layer
        quantized (``models/quantized.py``), quantized tensor by tensor as the checkpoint is read. A checkpoint
        saved quantized (``msllm-ckpt quantize``, or transformers with bitsandbytes) loads quantized by itself.
        Built without allocating random weights, then filled from `path`: the model is in memory once."""
        config_file = read_hf_config(path if config is None else config)[1]
        if quantization is not None or _saved_quantization(config_file) is not None:
            return load_quantized(path, Precision.from_names(param_dtype, compute_dtype), quantization, config_file,
                                  layout)
        model = AutoModelForCausalLM.from_config(load_config(config_file), param_dtype, compute_dtype,
                                                 materialize=False)
        load_weights(model, checkpoint_reader(path, model.config, layout, str(config_file)))
        model.name_or_path = str(path)
        return model


def _saved_quantization(config_file: str | os.PathLike) -> QuantizationConfig | None:
    hf, file = read_hf_config(config_file)
    return read_hf_quantization(hf, str(file))


def load_quantized(path: str | os.PathLike, precision: Precision | None = None,
                   quantization: str | QuantizationConfig | None = None, config: str | os.PathLike | None = None,
                   layout: LayoutOptions = LayoutOptions()) -> CausalLM:
    """The model of checkpoint `path` (any naming; `config` its config.json when none is beside it) with its linear
    weights quantized as they stream in, never all in float: built without allocating its parameters, each float
    linear weight quantized once read. `quantization` None: as the checkpoint was saved quantized."""
    config_file = read_hf_config(path if config is None else config)[1]
    saved = _saved_quantization(config_file)
    held = QuantizationConfig.of(quantization) if quantization is not None else saved
    if saved is not None and held != saved:
        raise ConfigError(f"{path}: saved quantized as {saved}; it cannot be loaded as {held}")
    model = build_model(load_config(config_file), precision, materialize=False)
    quantize_model(model, held, from_weights=False)
    reader = checkpoint_reader(path, model.config, layout, str(config_file))
    load_weights(model, QuantizingReader(model, reader, prequantized=saved is not None))
    model.name_or_path = str(path)
    return model

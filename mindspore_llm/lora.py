"""LoRA (Hu et al., https://arxiv.org/abs/2106.09685) as Hugging Face PEFT computes and names it.

A targeted linear layer y = x W^T + b becomes y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank with
A (rank, in) and B (out, rank) trainable and everything else frozen. The layer is replaced in place by a
``LoraLinear`` that takes over the base layer's parameters, so their names do not change
(``model.layers.0.self_attn.q_proj.weight``) and the adapters sit where PEFT puts them
(``...q_proj.lora_A.weight``, ``...q_proj.lora_B.weight``). Initialisation follows PEFT: A kaiming-uniform
(a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B zero, so a fresh adapter leaves the model unchanged.

QLoRA (Dettmers et al., https://arxiv.org/abs/2305.14314): with ``quantize_base`` the frozen base is held in NF4 (or
int8) and dequantized in the graph (``mindspore_llm.models.quantized``); the adapters, their training and their
export are the same.

Every op is a primitive instance: ``mindspore_llm.parallel.plan`` splits the adapters like their base layer.
A parallel job applies ``apply_plan(model, parallel)`` after ``apply_lora``.
"""
from __future__ import annotations

import fnmatch
import math
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Literal

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import HeUniform, initializer
from mindspore.ops import operations as P

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import require
from mindspore_llm.models import layers
from mindspore_llm.models.quantized import model_quantization, quantize_model
from mindspore_llm.models.shapes import layer_parameter_shapes
from mindspore_llm.quant import QuantizationConfig

ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
DROPOUT_KEY = "lora.dropout_key"  # the int32 key of every adapter's dropout mask (set each step, never saved)


@dataclass(kw_only=True)
class LoraConfig:
    """The training YAML's ``lora:`` section.

    ``target_modules`` entries select linear layers by their path (``model.layers.3.self_attn.q_proj``):
      a bare name (``q_proj``) matches the last path component, as PEFT's list form does;
      a glob with ``*``/``?``/``[`` or a dot (``*.self_attn.*_proj``, ``model.layers.[0-3].mlp.*``) matches the path;
      ``re:<regex>`` must match the whole path (PEFT's string form).
    Qwen: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj. DeepSeek MLA: q_a_proj q_b_proj
    kv_a_proj_with_mqa kv_b_proj o_proj; experts are included only by a pattern that names them (``*.experts.*``).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # PEFT's default for Qwen
    # QLoRA: hold the frozen base's linear layers quantized (embeddings, norms, LM head stay in their dtype)
    quantize_base: Literal["nf4", "int8"] | None = None
    double_quant: bool = False  # nf4: quantize the block scales too (QLoRA's double quantization)

    def validate(self) -> None:
        require(isinstance(self.rank, int) and self.rank >= 1, f"rank: must be an integer >= 1, got {self.rank!r}")
        require(not self.double_quant or self.quantize_base == "nf4",
                f"double_quant: needs quantize_base: nf4, got quantize_base: {self.quantize_base}")
        require(self.alpha > 0, f"alpha: must be positive, got {self.alpha!r}")
        require(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout!r}")
        require(len(self.target_modules) > 0, "target_modules: give at least one name or pattern")
        for i, pattern in enumerate(self.target_modules):
            require(isinstance(pattern, str) and pattern.strip() != "",
                    f"target_modules[{i}]: expected a non-empty string, got {pattern!r}")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ConfigError(f"target_modules[{i}]: invalid regex {pattern[3:]!r} ({err})") from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def quantization(self) -> QuantizationConfig | None:
        if self.quantize_base is None:
            return None
        return QuantizationConfig(method=self.quantize_base, double_quant=self.double_quant)

    def matches(self, path: str) -> bool:
        for pattern in self.target_modules:
            if pattern.startswith("re:"):
                found = re.fullmatch(pattern[3:], path) is not None
            elif any(c in pattern for c in "*?[."):
                found = fnmatch.fnmatchcase(path, pattern)
            else:
                found = path.rsplit(".", 1)[-1] == pattern
            if found:
                return True
        return False


class LoraLinear(layers.Linear):
    """A ``layers.Linear`` plus a low-rank update; built from an existing layer, whose parameters and primitives
    (with any shard strategy already set) it takes over without copying the weight."""

    def __init__(self, base: layers.Linear, rank: int, alpha: float, dropout: float, path: str = ""):
        nn.Cell.__init__(self)  # not Linear.__init__: that would allocate and initialise a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype, self.activation_dtype = base.compute_dtype, base.activation_dtype
        self.weight, self.bias = base.weight, base.bias
        self.matmul, self.bias_add, self.cast = base.matmul, base.bias_add, base.cast
        self.explicit_broadcast = base.explicit_broadcast
        precision = layers.Precision(base.weight.dtype, base.compute_dtype, base.activation_dtype,
                                     explicit_broadcast=base.explicit_broadcast)
        self.lora_A = layers.Linear(base.in_features, rank, False, precision, 0.0)
        self.lora_B = layers.Linear(rank, base.out_features, False, precision, 0.0)
        self.lora_A.weight.set_data(initializer(HeUniform(negative_slope=math.sqrt(5)), (rank, base.in_features),
                                                base.weight.dtype))
        self.lora_B.weight.set_data(initializer("zeros", (base.out_features, rank), base.weight.dtype))
        self.scaling = alpha / rank
        # Dropout only acts in training mode (``model.set_train(True)``), like nn.Dropout and PEFT's; its mask is a
        # function of the shared key the trainer sets from (seed, step), so resuming repeats it exactly.
        self.lora_dropout = layers.KeyedDropout(dropout, zlib.crc32(path.encode())) if dropout > 0 else None
        self.scale = P.Mul()
        self.add = P.Add()

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x = x.reshape(-1, self.in_features)
        y = super().construct(x)
        if self.training and self.lora_dropout is not None:
            x = self.lora_dropout(x)
        update = self.lora_B(self.lora_A(x))
        return self.add(y, self.scale(update, self.scaling)).reshape(out_shape)


def apply_lora(model: nn.Cell, cfg: LoraConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap each linear layer that `cfg.target_modules` selects; returns
    the wrapped layers' paths. Afterwards ``model.trainable_params()`` holds exactly the adapters.

    With ``cfg.quantize_base`` the base is quantized first if it is not yet (a model loaded quantized, e.g. by
    ``models.auto.load_quantized``, must be held the way the config says)."""
    cfg.validate()
    if cfg.quantization is not None:
        held = model_quantization(model)
        if held is None:
            quantize_model(model, cfg.quantization)
        elif held != cfg.quantization:
            raise ConfigError(f"lora.quantize_base: {cfg.quantization} asked for, the model is held as {held}")
    cells = dict(model.cells_and_names())
    targets = [name for name, cell in cells.items()
               if type(cell) is layers.Linear and not name.endswith((".lora_A", ".lora_B")) and cfg.matches(name)]
    if not targets:
        linears = sorted({name.rsplit(".", 1)[-1] for name, cell in cells.items() if type(cell) is layers.Linear})
        raise ConfigError(f"lora.target_modules: {cfg.target_modules} select no linear layer of this model; "
                          f"its linear layers are named {', '.join(linears)}")
    for param in model.get_parameters():
        param.requires_grad = False
    key = (Parameter(Tensor(0, ms.int32), name=DROPOUT_KEY, requires_grad=False) if cfg.dropout > 0 else None)
    for name in targets:
        parent, _, leaf = name.rpartition(".")
        wrapped = LoraLinear(cells[name], cfg.rank, cfg.alpha, cfg.dropout, name)
        cells[parent].insert_child_to_cell(leaf, wrapped)
        wrapped.update_parameters_name(name + ".")  # the full path: base names unchanged, adapters beside them
        if key is not None:  # shared by every adapter, set after naming so that it keeps its own name
            wrapped.lora_dropout.key = key
    # A graph already compiled for `model` is cached under its creation time: renew it so the next call recompiles.
    object.__setattr__(model, "_create_time", time.time_ns())
    return targets


def set_dropout_key(model: nn.Cell, seed: int, step: int, rank: int = 0) -> None:
    """Key the LoRA dropout masks of the coming step by (seed, step, data-parallel rank): every replica and every
    step draws its own masks, and a resumed run the same ones as the uninterrupted run."""
    params = [p for p in model.get_parameters() if p.name == DROPOUT_KEY]
    if params:
        key = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0] & 0x7FFFFFFF)
        params[0].set_data(Tensor(key, ms.int32))


def lora_layers(model: nn.Cell) -> dict[str, LoraLinear]:
    """path -> LoraLinear of every adapted layer of `model`."""
    return {name: cell for name, cell in model.cells_and_names() if isinstance(cell, LoraLinear)}


def adapter_weights(model: nn.Cell) -> dict[str, np.ndarray]:
    """Our parameter name -> float32 value of every lora_A / lora_B weight."""
    return {param.name: param.astype(ms.float32).asnumpy()
            for param in model.get_parameters() if param.name.endswith(ADAPTER_SUFFIXES)}


def lora_parameter_shapes(config, lora: LoraConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Adapters A (rank, in) and B (out, rank) on every targeted linear layer (peft's names)."""
    shapes = []
    for index in range(config.num_hidden_layers):
        for name, shape in layer_parameter_shapes(config, index):
            parts = name.split(".")
            base = name[: -len(".weight")]
            if parts[-1] == "weight" and len(shape) == 2 and lora.matches(base):
                out, inp = shape
                shapes += [(f"{base}.lora_A.weight", (lora.rank, inp)), (f"{base}.lora_B.weight", (out, lora.rank))]
    return shapes

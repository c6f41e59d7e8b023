"""Frozen linear weights held quantized (``mindspore_llm.quant``: NF4, optionally double-quantized, or int8) and
dequantized inside the graph.

A quantized linear layer is still a ``layers.Linear`` with its name, interface and shard strategies; only its
``weight`` is a Cell (``NF4Weight``, ``Int8Weight``) whose construct returns the (out, in) matrix in float32, which
the layer casts to its compute dtype for the matmul. So LoRA wraps it as any linear layer, and the plan splits the
codes and block scales together with the layer. Its parameters sit under the weight's name, as bitsandbytes'
tensors do: ``q_proj.weight.codes`` (which bitsandbytes stores as ``q_proj.weight`` itself),
``q_proj.weight.absmax``, ``q_proj.weight.nested_absmax`` and ``q_proj.weight.nested_offset`` (in its quant state).

Embeddings, norms, the LM head and the MoE routers are no ``layers.Linear``: they stay in the parameter dtype, as
bitsandbytes leaves ``lm_head`` (and transformers 5's fused routed experts) unquantized.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops import operations as P

from mindspore_llm.checkpoint import ArrayTensor
from mindspore_llm.common import CheckpointError, ConfigError
from mindspore_llm.models import layers
from mindspore_llm.models.shapes import layer_parameter_shapes, moe_layer
from mindspore_llm.quant import (BLOCKSIZE, DYNAMIC_MAP, NESTED_BLOCKSIZE, NF4_CODE, QuantizationConfig,
                                 bnb_suffixes, check_shape, from_bnb_tensors, quantize)

# The two NF4 values of each byte (high nibble first): one gather decodes a byte without bit operations.
NF4_PAIRS = np.stack([NF4_CODE[np.arange(256) >> 4], NF4_CODE[np.arange(256) & 15]], axis=1)
INT8_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes' int8_vectorwise_dequant writes it (the same float32)


class QuantizedWeight(nn.Cell):
    """What NF4 and int8 weights share: their arrays as frozen parameters, the shape and dtype of the weight they
    stand for (a LoRA adapter beside it is made in that dtype), and no gradient into the dequantization.

    ``recompute()``: backward dequantizes again instead of keeping each layer's float weight until then, as
    bitsandbytes' MatMul4Bit does."""

    def __init__(self, config: QuantizationConfig, out_features: int, in_features: int, dtype):
        super().__init__()
        check_shape((out_features, in_features), "weight")
        self.config = config
        self.shape = (out_features, in_features)
        self.dtype = dtype
        for name, (shape, np_dtype) in config.shapes(out_features, in_features).items():
            setattr(self, name, Parameter(Tensor(np.zeros(shape, np_dtype)), name=name, requires_grad=False))
        self.recompute()


class NF4Weight(QuantizedWeight):
    """w[r, 64 b + j] = NF4[code] * absmax[r, b]; double-quantized, absmax = DYNAMIC[absmax code] *
    nested_absmax[flat block index // 256] + nested_offset. fp32 arithmetic in bitsandbytes' order."""

    def __init__(self, out_features: int, in_features: int, double_quant: bool, dtype):
        super().__init__(QuantizationConfig(method="nf4", double_quant=double_quant), out_features, in_features,
                         dtype)
        self.double_quant = double_quant
        self.pairs = Tensor(NF4_PAIRS)
        self.dynamic_map = Tensor(DYNAMIC_MAP)
        self.cast = P.Cast()
        self.gather = P.Gather()
        self.scale = P.Mul()
        self.cast_absmax = P.Cast()
        self.gather_absmax = P.Gather()
        self.scale_absmax = P.Mul()
        self.add_offset = P.Add()

    def _block_absmax(self):
        if not self.double_quant:
            return self.absmax
        rows, blocks = self.absmax.shape
        deviation = self.gather_absmax(self.dynamic_map, self.cast_absmax(self.absmax, ms.int32), 0)
        nested = ops.broadcast_to(self.nested_absmax.reshape(-1, 1), (self.nested_absmax.shape[0], NESTED_BLOCKSIZE))
        nested = nested.reshape(-1)
        if nested.shape[0] != rows * blocks:  # the last nested block is shorter
            nested = nested[:rows * blocks]
        return self.add_offset(self.scale_absmax(deviation, nested.reshape(rows, blocks)), self.nested_offset)

    def construct(self):
        rows, columns = self.shape
        values = self.gather(self.pairs, self.cast(self.codes, ms.int32), 0)  # (out, in/2, 2)
        blocks = columns // BLOCKSIZE
        weight = self.scale(values.reshape(rows, blocks, BLOCKSIZE), self._block_absmax().reshape(rows, blocks, 1))
        return ops.stop_gradient(weight.reshape(rows, columns))


class Int8Weight(QuantizedWeight):
    """w[r, c] = code[r, c] * absmax[r] / 127."""

    def __init__(self, out_features: int, in_features: int, dtype):
        super().__init__(QuantizationConfig(method="int8"), out_features, in_features, dtype)
        self.cast = P.Cast()
        self.scale = P.Mul()
        self.scale_127 = P.Mul()

    def construct(self):
        rows, _ = self.shape
        weight = self.scale(self.cast(self.codes, ms.float32), self.absmax.reshape(rows, 1))
        return ops.stop_gradient(self.scale_127(weight, INT8_SCALE))


def quantized_weight(config: QuantizationConfig, out_features: int, in_features: int, dtype) -> QuantizedWeight:
    if config.method == "int8":
        return Int8Weight(out_features, in_features, dtype)
    return NF4Weight(out_features, in_features, config.double_quant, dtype)


def linear_layers(model: nn.Cell) -> dict[str, layers.Linear]:
    """path -> every linear layer of the base model (LoRA adapters excluded)."""
    return {name: cell for name, cell in model.cells_and_names()
            if isinstance(cell, layers.Linear) and not name.endswith((".lora_A", ".lora_B"))}


def model_quantization(model: nn.Cell) -> QuantizationConfig | None:
    """How the model's linear layers are held (None: not quantized)."""
    return next((cell.config for _, cell in model.cells_and_names() if isinstance(cell, QuantizedWeight)), None)


def quantize_model(model: nn.Cell, config: QuantizationConfig, from_weights: bool = True) -> list[str]:
    """Hold the weight of every linear layer of `model` quantized; returns their paths. `from_weights`: quantize
    the weights the layers hold, one at a time (each float weight is released once quantized); otherwise the
    quantized weights start empty for ``load_weights`` to fill, and the float ones are never read (build the model
    under ``mindspore.nn.utils.no_init_parameters`` and they are never allocated either)."""
    linears = {path: linear for path, linear in linear_layers(model).items()
               if not isinstance(linear.weight, QuantizedWeight)}
    for path, linear in linears.items():  # every layer checked before any is changed
        check_shape((linear.out_features, linear.in_features), f"{path}.weight")
    for path, linear in linears.items():
        quantized = quantized_weight(config, linear.out_features, linear.in_features, linear.weight.dtype)
        if from_weights:
            for name, value in quantize(linear.weight.astype(ms.float32).asnumpy(), config).items():
                getattr(quantized, name).set_data(Tensor(value))
        del linear.weight
        linear.weight = quantized
        quantized.update_parameters_name(f"{path}.weight.")
    # A graph already compiled for `model` is cached under its creation time: renew it so the next call recompiles.
    object.__setattr__(model, "_create_time", time.time_ns())
    return list(linears)


def quantizing_tensors(model: nn.Cell, tensors: Iterable[tuple[str, object]], prequantized: bool = False
                       ) -> Iterator[tuple[str, object]]:
    """For ``checkpoint.load_weights``: (name, reader) pairs of a checkpoint -> the same for a model with quantized
    weights. A float ``X.weight`` of a quantized layer is quantized as it arrives (one tensor in memory at a
    time); in a `prequantized` checkpoint (bitsandbytes' layout, in our names) the tensors of a quantized layer
    (``X.weight`` stored as integers, ``X.weight.absmax``, ..., or ``X.SCB``) are gathered and mapped to ours.
    Everything else passes unchanged."""
    held = {path: linear.weight for path, linear in linear_layers(model).items()
            if isinstance(linear.weight, QuantizedWeight)}
    pieces = {f"{path}.{suffix}": (path, suffix) for path, weight in held.items()
              for suffix in bnb_suffixes(weight.config)}
    pending: dict[str, dict[str, np.ndarray]] = {}
    for name, reader in tensors:
        if name not in pieces:
            yield name, reader
            continue
        path, suffix = pieces[name]
        weight = held[path]
        if suffix == "weight" and not (prequantized and reader.dtype(name) in ("U8", "I8")):  # a float weight
            if reader.shape(name) != weight.shape:
                raise CheckpointError(f"{reader.path}: tensor {name} has shape {reader.shape(name)}, the model "
                                      f"expects {weight.shape}")
            arrays = quantize(reader.float32(name), weight.config)
        else:
            found = pending.setdefault(path, {})
            found[suffix] = np.array(reader.raw(name))
            if set(found) != set(bnb_suffixes(weight.config)):
                continue
            config, arrays = from_bnb_tensors(pending.pop(path), weight.shape, f"{reader.path}: {path}")
            if config != weight.config:
                raise ConfigError(f"{reader.path}: {path} is stored as {config}, the model holds {weight.config}")
        for array_name, value in arrays.items():
            yield f"{path}.weight.{array_name}", ArrayTensor(value, reader.path)


def quantized_weight_shapes(config) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of every weight a quantized model holds quantized, from the config alone (the planner and
    ``msllm-ckpt quantize`` use it): the 2-D weights of the decoder layers but a MoE layer's router."""
    shapes = []
    for index in range(config.num_hidden_layers):
        router = "mlp.gate.weight" if moe_layer(config, index) else None
        shapes += [(name, shape) for name, shape in layer_parameter_shapes(config, index)
                   if name.endswith(".weight") and len(shape) == 2 and not (router and name.endswith(router))]
    return shapes

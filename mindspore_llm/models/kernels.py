"""Which implementation each fusable op runs: the decomposition into small ops, or the platform's fused kernel.

One switch per op, chosen once when the model is built (``Precision.kernels``) from the device target: on Ascend
every fused kernel MindSpore 2.10 provides for these layers, on CPU (which has none of them) the decomposition,
which stays the numerical reference. ``MSLLM_KERNELS`` overrides the choice, for testing a fused graph on CPU or
for switching one kernel off on Ascend: ``ascend`` (all fused), ``cpu`` (none), or a comma list of the fused ops
to use (``flash_attention,rms_norm``; ``none`` for the empty list).

The kernels (all ``Supported Platforms: Ascend`` in 2.10; none is registered on CPU, verified):
  flash_attention  ``FlashAttentionScore`` (``ops.flash_attention_score``), TND layout, causal per document through
                   ``actual_seq_qlen``/``actual_seq_kvlen``; instead of the (B, 1, S, S) fp32 bias and S x S scores
  rms_norm         ``RmsNorm`` (``ops.rms_norm``); instead of square, mean, add, rsqrt, two muls
  rotary           ``RotaryPositionEmbedding`` (``ops.rotary_position_embedding``, mode 0 = rotate_half); instead
                   of slice, neg, concat, two muls and an add
  swiglu           ``Swiglu`` (``ops.swiglu``) over gate and up stacked; instead of silu and mul
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from mindspore_llm.common import ConfigError

ENV = "MSLLM_KERNELS"

# what each switch runs when on, as rehearse and the docs name it
FUSED_KERNELS = {
    "flash_attention": "FlashAttentionScore (ops.flash_attention_score), TND layout, sparse_mode 3 (causal) per "
                       "document via actual_seq_qlen/kvlen, GQA K/V not repeated",
    "rms_norm": "RmsNorm (ops.rms_norm)",
    "rotary": "RotaryPositionEmbedding (ops.rotary_position_embedding), mode 0 (rotate_half), BNSD",
    "swiglu": "Swiglu (ops.swiglu) on gate and up stacked",
}
# the MindSpore primitive each switch puts into the graph
PRIMITIVES = {"flash_attention": "FlashAttentionScore", "rms_norm": "RmsNorm", "rotary": "RotaryPositionEmbedding",
              "swiglu": "Swiglu"}
DECOMPOSED = {
    "flash_attention": "BatchMatMul, fp32 softmax, BatchMatMul with a (B, 1, S, S) additive mask; K/V repeated "
                       "per group",
    "rms_norm": "Square, ReduceMean, Add, Rsqrt, Mul, Mul",
    "rotary": "slice, Neg, Concat, Mul, Mul, Add",
    "swiglu": "SiLU, Mul",
}


@dataclass(frozen=True)
class Kernels:
    flash_attention: bool = False
    rms_norm: bool = False
    rotary: bool = False
    swiglu: bool = False

    @classmethod
    def all_fused(cls) -> "Kernels":
        return cls(**{f.name: True for f in fields(cls)})

    @classmethod
    def parse(cls, text: str, source: str = ENV) -> "Kernels":
        """``ascend``, ``cpu``, ``none`` or a comma list of switch names."""
        text = text.strip().lower()
        if text == "ascend":
            return cls.all_fused()
        if text in ("cpu", "none", ""):
            return cls()
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in FUSED_KERNELS]
        if unknown:
            raise ConfigError(f"{source}: unknown kernel(s) {', '.join(unknown)}; expected 'ascend', 'cpu', 'none' "
                              f"or a comma list of {', '.join(FUSED_KERNELS)}")
        return cls(**{name: True for name in names})

    def describe(self) -> list[str]:
        """One line per op: what runs."""
        return [f"{name}: {FUSED_KERNELS[name] if getattr(self, name) else 'decomposed: ' + DECOMPOSED[name]}"
                for name in FUSED_KERNELS]

    @property
    def fused(self) -> tuple[str, ...]:
        return tuple(name for name in FUSED_KERNELS if getattr(self, name))


def select_kernels(device_target: str | None = None) -> Kernels:
    """The kernels a model built for `device_target` (default: MindSpore's current one) uses; ``MSLLM_KERNELS``
    overrides."""
    override = os.environ.get(ENV)
    if override is not None:
        return Kernels.parse(override)
    if device_target is None:
        import mindspore as ms

        device_target = ms.get_context("device_target")
    return Kernels.all_fused() if device_target == "Ascend" else Kernels()

"""Layers every family shares: linear, RMSNorm, rotary embeddings (default/linear/dynamic/yarn), the attention
mask, dot-product attention, grouped-query attention, the SwiGLU MLP, the decoder skeleton and the LM loss; and the
key/value cache path that generation runs (``construct_cached``: the training forward never takes it).

Kernels: RMSNorm, the rotary product, the attention core and SwiGLU each run either as the decomposition written
here (CPU, and the numerical reference) or as Ascend's fused kernel, by ``Precision.kernels`` (models/kernels.py).

Precision policy: parameters live in ``param_dtype``; matmuls run in ``compute_dtype``; the activations between
them (residual stream, MLP and rope products) are kept in ``activation_dtype`` (the compute dtype for O2, fp32
for O1); norms, rotary tables, softmax and the loss run in fp32. Ops that a parallel plan may split are primitive
instances (``P.MatMul()``...) so that ``mindspore_llm.parallel.plan`` can give each its strategy; the model code never
decides a split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.ops import operations as P
from mindspore.ops.auto_generate.gen_ops_prim import (FlashAttentionScore, RmsNorm, RotaryPositionEmbedding, SiLU,
                                                      Swiglu)

from mindspore_llm.checkpoint import NON_PARAMETER_SUFFIXES
from mindspore_llm.common import IGNORE_INDEX, ConfigError
from mindspore_llm.models.config import RopeConfig
from mindspore_llm.models.kernels import Kernels, select_kernels

DTYPES = {"fp32": ms.float32, "float32": ms.float32, "fp16": ms.float16, "float16": ms.float16,
          "bf16": ms.bfloat16, "bfloat16": ms.bfloat16}


def broadcast_explicitly() -> bool:
    """Whether the layers take the forms that spare MindSpore 2.10's CPU kernels their index maps: elementwise ops
    get operands of one shape (``ops.broadcast_to`` first), the attention softmax's gradient is written out
    (``SoftmaxExpandedGrad``) and the loss uses LogSoftmax's kernel.

    On CPU, the kernel of a broadcasting Mul/Add/Sub (and of every RealDiv) keeps two int64 index maps of its
    output's size for the life of the compiled graph, forward and backward: 16 bytes per output element (1 GB for
    the loss's logits - row max at 2048 x 32000). BroadcastTo and same-shape ops keep none, and the expanded operand
    is a transient pool buffer (docs/training_numerics.md, "Memory"). Ascend kernels broadcast in place, so there it
    would only add a copy; a cluster's graph keeps the forms its plan shards."""
    return ms.get_context("device_target") == "CPU"


@dataclass(frozen=True)
class Precision:
    param_dtype: ms.dtype = ms.float32
    compute_dtype: ms.dtype = ms.float32
    activation_dtype: ms.dtype | None = None  # None: the compute dtype
    kernels: Kernels = field(default_factory=select_kernels)  # fused or decomposed, per op
    # the CPU kernels' memory-saving forms (``broadcast_explicitly``); False: the forms a cluster's graph uses, whose
    # shapes the plan's strategy checks trace
    explicit_broadcast: bool = field(default_factory=lambda: broadcast_explicitly())

    @property
    def activations(self) -> ms.dtype:
        return self.compute_dtype if self.activation_dtype is None else self.activation_dtype

    @classmethod
    def from_names(cls, param_dtype: str = "fp32", compute_dtype: str = "fp32",
                   activation_dtype: str | None = None) -> "Precision":
        for name in (param_dtype, compute_dtype, activation_dtype or compute_dtype):
            if name not in DTYPES:
                raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
        return cls(DTYPES[param_dtype], DTYPES[compute_dtype], activation_dtype and DTYPES[activation_dtype])


class Linear(nn.Cell):
    """y = x W^T + b, W stored (out, in) as in Hugging Face checkpoints, computed in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, precision: Precision, init_std: float):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = precision.compute_dtype
        self.activation_dtype = precision.activations
        self.weight = Parameter(initializer(Normal(init_std), (out_features, in_features), precision.param_dtype),
                                name="weight")
        self.bias = (Parameter(initializer("zeros", (out_features,), precision.param_dtype), name="bias")
                     if bias else None)
        self.matmul = P.MatMul(transpose_b=True)
        self.bias_add = P.Add()
        self.cast = P.Cast()
        self.explicit_broadcast = precision.explicit_broadcast

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x = self.cast(x, self.compute_dtype).reshape(-1, self.in_features)
        # a frozen quantized weight is a Cell that dequantizes it here, in the graph (models/quantized.py)
        weight = self.weight() if isinstance(self.weight, nn.Cell) else self.weight
        y = self.matmul(x, self.cast(weight, self.compute_dtype))
        if self.bias is not None:
            bias = self.cast(self.bias, self.compute_dtype)
            y = self.bias_add(y, ops.broadcast_to(bias, y.shape) if self.explicit_broadcast else bias)
        return self.cast(y, self.activation_dtype).reshape(out_shape)


def _int32(value: int) -> int:
    """The int32 with the bits of the uint32 `value` (MindSpore's int32 multiply wraps like uint32's)."""
    return int(np.uint32(value).view(np.int32))


class KeyedDropout(nn.Cell):
    """Dropout on a (rows, features) input whose mask is a hash of (``key``, this layer's ``salt``, the element's
    index) rather than a stateful generator's next draw: the same key gives the same mask, so a run resumed from a
    checkpoint, a recomputed forward pass and the uninterrupted run drop the same elements (MindSpore's Dropout
    kernels restart their state with the process, and the generator-driven dropout has no CPU kernel). The caller
    sets ``key`` (a shared int32 Parameter) before each step. Kept elements are scaled by 1 / keep_prob, as
    torch.nn.Dropout does.

    The hash is MurmurHash3's 32-bit finaliser (fmix32) of index ^ (key * 0x9E3779B1 + salt), in int32 arithmetic
    (multiplies wrap as uint32's do; a logical shift is an arithmetic shift and a mask); its low 24 bits are the
    uniform draw. Every op is a primitive instance, so the plan splits the mask like the input.
    """

    def __init__(self, p: float, salt: int, key: Parameter | None = None):
        super().__init__()
        self.key = key

        def constant(value):
            return Tensor(int(np.uint32(value).view(np.int32)), ms.int32)

        self.golden, self.salt = constant(0x9E3779B1), constant(salt)
        self.c1, self.c2 = constant(0x85EBCA6B), constant(0xC2B2AE35)
        self.by_16, self.by_13 = constant(16), constant(13)
        self.low_16, self.low_19, self.low_24 = constant(0xFFFF), constant(0x7FFFF), constant(0xFFFFFF)
        self.threshold = constant(round((1.0 - p) * 2 ** 24))
        self.inverse_keep = 1.0 / (1.0 - p)
        self.mul_key, self.add_salt = P.Mul(), P.Add()
        self.add_features, self.xor_seed = P.Add(), P.BitwiseXor()
        self.shift_1, self.low_1, self.xor_1, self.mul_1 = P.RightShift(), P.BitwiseAnd(), P.BitwiseXor(), P.Mul()
        self.shift_2, self.low_2, self.xor_2, self.mul_2 = P.RightShift(), P.BitwiseAnd(), P.BitwiseXor(), P.Mul()
        self.shift_3, self.low_3, self.xor_3 = P.RightShift(), P.BitwiseAnd(), P.BitwiseXor()
        self.draw, self.less, self.cast, self.apply_mask, self.scale = (P.BitwiseAnd(), P.Less(), P.Cast(), P.Mul(),
                                                                       P.Mul())

    def construct(self, x):
        rows, features = x.shape
        seed = self.add_salt(self.mul_key(self.key, self.golden), self.salt)
        row_starts = ops.arange(0, rows * features, features, dtype=ms.int32).reshape(rows, 1)
        feature_ids = ops.arange(0, features, dtype=ms.int32).reshape(1, features)
        h = self.xor_seed(self.add_features(row_starts, feature_ids), seed)
        h = self.mul_1(self.xor_1(h, self.low_1(self.shift_1(h, self.by_16), self.low_16)), self.c1)
        h = self.mul_2(self.xor_2(h, self.low_2(self.shift_2(h, self.by_13), self.low_19)), self.c2)
        h = self.xor_3(h, self.low_3(self.shift_3(h, self.by_16), self.low_16))
        kept = self.cast(self.less(self.draw(h, self.low_24), self.threshold), x.dtype)
        return self.scale(self.apply_mask(x, kept), self.inverse_keep)


class Embedding(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, precision: Precision, init_std: float):
        super().__init__()
        self.activation_dtype = precision.activations
        self.weight = Parameter(initializer(Normal(init_std), (vocab_size, hidden_size), precision.param_dtype),
                                name="weight")
        self.gather = P.Gather()
        self.cast = P.Cast()

    def construct(self, input_ids):
        return self.cast(self.gather(self.weight, input_ids, 0), self.activation_dtype)


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 and returned in the input dtype."""

    def __init__(self, dim: int, eps: float, precision: Precision):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (dim,), precision.param_dtype), name="weight")
        self.fused = precision.kernels.rms_norm
        self.rms_norm = RmsNorm(eps)
        self.square = P.Square()
        self.mean = P.ReduceMean(keep_dims=True)
        self.rsqrt = P.Rsqrt()
        self.add_eps = P.Add()
        self.mul = P.Mul()
        self.mul_weight = P.Mul()
        self.cast = P.Cast()
        self.explicit_broadcast = precision.explicit_broadcast

    def construct(self, x):
        dtype = x.dtype
        if self.fused:
            # RmsNorm(x, gamma) -> (x * rsqrt(mean(x^2, -1) + epsilon) * gamma, rstd): x and gamma of one dtype,
            # gamma over the last axis; the decomposition rounds the normalised x to x's dtype before gamma.
            return self.rms_norm(x, self.cast(self.weight, dtype))[0]
        x32 = self.cast(x, ms.float32)
        variance = self.mean(self.square(x32), -1)
        inverse_rms = self.rsqrt(self.add_eps(variance, self.eps))
        weight = self.cast(self.weight, dtype)
        if self.explicit_broadcast:
            inverse_rms = ops.broadcast_to(inverse_rms, x32.shape)
            weight = ops.broadcast_to(weight, x.shape)
        normed = self.mul(x32, inverse_rms)
        return self.mul_weight(self.cast(normed, dtype), weight)


def rope_inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """inv_freq (dim/2,) and the cos/sin scale, as transformers' ROPE_INIT_FUNCTIONS compute them.

    ``dynamic`` returns the unscaled frequencies: RotaryEmbedding rescales them from the positions it sees.
    """
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / rope.rope_theta ** exponents).astype(np.float32)
    if rope.rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32), 1.0
    # yarn (https://arxiv.org/abs/2309.00071): interpolate low frequencies, keep high ones, ramp in between.
    factor, base = rope.factor, rope.rope_theta

    def mscale(scale: float, coefficient: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    interpolated = inv_freq / np.float32(factor)
    mixed = interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return mixed.astype(np.float32), float(attention_factor)


class RotaryEmbedding(nn.Cell):
    """cos/sin tables (B, S, dim) in fp32 for the given position ids; computed in-graph, so any positions
    (left padding, packed documents with reset positions) work without a precomputed table."""

    def __init__(self, rope: RopeConfig, dim: int, max_position_embeddings: int):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inverse_frequencies(rope, dim)
        self.inv_freq = Tensor(inv_freq)
        self.dynamic = rope.rope_type == "dynamic"
        self.factor = rope.factor
        self.base = rope.rope_theta
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.exponents = Tensor(np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        self.cast = P.Cast()
        self.concat = P.Concat(-1)

    def construct(self, position_ids):
        positions = self.cast(position_ids, ms.float32)
        inv_freq = self.inv_freq
        if self.dynamic:
            # NTK-aware base growth once the sequence outgrows max_position_embeddings (no change below it).
            seq_len = ops.maximum(positions.max() + 1.0, float(self.max_position_embeddings))
            growth = (self.factor * seq_len / self.max_position_embeddings) - (self.factor - 1)
            base = self.base * ops.pow(growth, self.dim / (self.dim - 2))
            inv_freq = 1.0 / ops.pow(base, self.exponents)
        freqs = positions.expand_dims(-1) * inv_freq
        emb = self.concat((freqs, freqs))
        return ops.cos(emb) * self.attention_scaling, ops.sin(emb) * self.attention_scaling


class ApplyRotary(nn.Cell):
    """x * cos + rotate_half(x) * sin for x (B, heads, S, dim) and tables (B, S, dim)."""

    def __init__(self, dim: int, precision: Precision):
        super().__init__()
        self.half = dim // 2
        self.fused = precision.kernels.rotary
        self.rope = RotaryPositionEmbedding()
        self.mul_cos = P.Mul()
        self.mul_sin = P.Mul()
        self.add = P.Add()
        self.neg = P.Neg()
        self.concat = P.Concat(-1)
        self.cast = P.Cast()
        self.explicit_broadcast = precision.explicit_broadcast

    def construct(self, x, cos, sin):
        dtype = x.dtype
        x = self.cast(x, ms.float32)
        if self.fused:
            # RotaryPositionEmbedding(x, cos, sin, mode): x BNSD, cos/sin B1SD of x's dtype (fp32 here, as the
            # decomposition); mode 0 is rotate_half, x * cos + concat(-x2, x1) * sin, the convention below.
            return self.cast(self.rope(x, cos.expand_dims(1), sin.expand_dims(1), 0), dtype)
        x1 = x[..., :self.half]
        x2 = x[..., self.half:]
        rotated = self.concat((self.neg(x2), x1))
        cos, sin = cos.expand_dims(1), sin.expand_dims(1)
        if self.explicit_broadcast:
            cos, sin = ops.broadcast_to(cos, x.shape), ops.broadcast_to(sin, x.shape)
        out = self.add(self.mul_cos(x, cos), self.mul_sin(rotated, sin))
        return self.cast(out, dtype)


# FlashAttentionScore takes at most this many actual sequence lengths per call (CANN's aclnn documentation: 1..2K).
MAX_FLASH_SEGMENTS = 2048
# The compressed causal mask sparse_mode 3 (rightDownCausal) reads: (2048, 2048), 1 = masked out, above the diagonal.
FLASH_CAUSAL_MASK_SIZE = 2048


def flash_segments(batch: int, seq_len: int, batch_split: int = 1) -> int:
    """Segments per row the flash attention mask reserves: every token its own document when the batch allows,
    else the kernel's limit shared by the rows one device holds (2048 // (batch / batch_split); more documents in
    a row merge its last ones)."""
    return max(1, min(seq_len, MAX_FLASH_SEGMENTS // max(1, batch // batch_split)))


class AttentionMask(nn.Cell):
    """What the attention core needs to keep each query to its own document's past: ``attention_mask`` is Hugging
    Face's 0/1 padding mask or, for packed sequences, document ids (0 = padding), each document a contiguous run.

    Decomposed: an additive fp32 bias (B, 1, S, S), 0 where query i may see key j (j <= i, j not padding, same
    document), the float32 minimum elsewhere. Flash attention: the (B * K,) cumulative end positions of the runs of
    equal ids over the flattened batch, K = ``flash_segments(B, S, batch_split)`` per row (``batch_split``: how
    many ways the plan splits the rows, as the kernel's limit counts one device's), unused entries repeating the
    row's end (zero-length segments, as mindformers pads its compressed EOD lengths). A padding run is a segment of
    its own: real tokens never see it, and its queries' outputs are not trained on.

    With the CPU forms (``explicit_broadcast``) the bias is expanded to (B, heads, S, S) here, once per step, rather
    than in every layer's attention.
    """

    def __init__(self, precision: Precision, num_heads: int = 1):
        super().__init__()
        self.min_value = float(np.finfo(np.float32).min)
        self.expanded_heads = num_heads if precision.explicit_broadcast else None
        self.flash = precision.kernels.flash_attention
        self.batch_split = 1
        self.smallest = P.TopK(sorted=True)
        self.concat = P.Concat(1)

    def construct(self, attention_mask, batch: int, seq_len: int):
        if self.flash:
            return self._document_ends(attention_mask, batch, seq_len)
        rows = ops.arange(seq_len).reshape(seq_len, 1)
        cols = ops.arange(seq_len).reshape(1, seq_len)
        allowed = (cols <= rows).reshape(1, 1, seq_len, seq_len)
        if attention_mask is not None:
            doc = attention_mask.astype(ms.int32)
            query_doc = doc.reshape(doc.shape[0], 1, seq_len, 1)
            key_doc = doc.reshape(doc.shape[0], 1, 1, seq_len)
            allowed = ops.logical_and(allowed, ops.logical_and(query_doc == key_doc, key_doc != 0))
        bias = self._bias(allowed)
        if self.expanded_heads is not None:
            bias = ops.broadcast_to(bias, (batch, self.expanded_heads, seq_len, seq_len))
        return bias

    def for_cache(self, key_mask, start, seq_len: int):
        """(B, 1, S, L) for S queries at cache slots start .. start + S - 1 over a cache of L slots: query i sees
        slot j when j <= start + i and ``key_mask`` (B, L) marks j as a token (0 = padding). Slots not yet written
        lie after every query, so causality alone hides them."""
        batch, length = key_mask.shape
        query_slots = (ops.arange(seq_len, dtype=ms.int32) + start).reshape(1, 1, seq_len, 1)
        key_slots = ops.arange(length, dtype=ms.int32).reshape(1, 1, 1, length)
        allowed = ops.logical_and(key_slots <= query_slots, key_mask.reshape(batch, 1, 1, length) != 0)
        return self._bias(allowed)

    def _bias(self, allowed):
        return ops.select(allowed, ops.zeros(allowed.shape, ms.float32),
                          ops.full(allowed.shape, self.min_value, dtype=ms.float32))

    def _document_ends(self, attention_mask, batch: int, seq_len: int):
        segments = flash_segments(batch, seq_len, self.batch_split)
        row_end = ops.full((batch, 1), seq_len, dtype=ms.float32)
        ends = row_end
        if attention_mask is not None and segments > 1:
            doc = attention_mask.astype(ms.int32)
            changes = doc[:, 1:] != doc[:, :-1]  # a run ends after position t
            positions = ops.arange(1, seq_len, dtype=ms.float32).reshape(1, seq_len - 1)
            candidates = ops.select(changes, positions.broadcast_to(changes.shape),
                                    row_end.broadcast_to(changes.shape))
            # the segments - 1 smallest, ascending (TopK of the negated values; positions are exact in fp32)
            inner = -self.smallest(-candidates, segments - 1)[0]
            ends = self.concat((inner, row_end))
        offsets = (ops.arange(batch, dtype=ms.float32) * seq_len).reshape(batch, 1)
        return (ends + offsets).reshape(-1).astype(ms.int64)


def repeat_kv(tile, x, heads: int):
    """(B, kv_heads, S, D) -> (B, heads, S, D), each key/value head serving heads / kv_heads query heads in turn."""
    batch, kv_heads, seq_len, dim = x.shape
    if kv_heads == heads:
        return x
    x = tile(x.expand_dims(2), (1, 1, heads // kv_heads, 1, 1))
    return x.reshape(batch, heads, seq_len, dim)


class SoftmaxExpandedGrad(nn.Cell):
    """`softmax` (a last-axis ``P.Softmax`` of (B, heads, S, L) scores) with its gradient written out,
    y * (dy - rowsum(dy * y)), the row sum expanded to the scores' shape first. MindSpore 2.10's CPU SoftmaxGrad
    subtracts it broadcasting and keeps two int64 index maps of the scores' size for the life of the graph
    (``broadcast_explicitly``): 128 MB per layer at 4 x 8 x 512 x 512. The primitive stays the parent's, so the
    plan's strategy for it still applies. The row sum and its expansion are products with ones (BatchMatMul): on
    this backend 9 and 4 ms at that shape, against 21 ms for ReduceSum and 17 ms for BroadcastTo."""

    def __init__(self, softmax):
        super().__init__()
        self.softmax = softmax

    def construct(self, x):
        return self.softmax(x)

    def bprop(self, x, out, dout):
        rows, length = out.shape[-2:]
        products = (dout * out).reshape(-1, rows, length)
        row_sums = ops.bmm(products, ops.ones((products.shape[0], length, 1), out.dtype))
        expanded = ops.bmm(row_sums, ops.ones((products.shape[0], 1, length), out.dtype)).reshape(out.shape)
        return (out * (dout - expanded),)


class DotProductAttention(nn.Cell):
    """The attention core: queries (B, heads, S, D), keys (B, kv_heads, S, D) and values (B, kv_heads, S, Dv) ->
    (B, S, heads * Dv), softmax(q k^T * scaling, masked) v; ``mask`` is what ``AttentionMask`` returns for the same
    kernel choice. Decomposed: K/V repeated per group, scores and softmax in fp32. Flash: ``FlashAttentionScore``
    on the compute dtype (16-bit only), no S x S tensor stored, K/V not repeated."""

    def __init__(self, num_heads: int, scaling: float, precision: Precision):
        super().__init__()
        self.scaling = scaling
        self.compute_dtype = precision.compute_dtype
        self.activation_dtype = precision.activations
        self.flash = precision.kernels.flash_attention
        self.cast = P.Cast()
        self.merge_transpose = P.Transpose()
        self.repeat_kv = P.Tile()
        self.qk_matmul = P.BatchMatMul(transpose_b=True)
        self.scale = P.Mul()
        self.add_bias = P.Add()
        self.softmax = P.Softmax(-1)
        self.pv_matmul = P.BatchMatMul()
        self.explicit_broadcast = precision.explicit_broadcast
        # CPU: the same primitive, inside a cell that writes its gradient out
        self.softmax_expanded_grad = SoftmaxExpandedGrad(self.softmax) if self.explicit_broadcast else None
        if self.flash and self.compute_dtype not in (ms.float16, ms.bfloat16):
            raise ConfigError(f"flash attention (FlashAttentionScore) takes float16 or bfloat16, but the model "
                              f"computes in {self.compute_dtype}: set precision.compute_dtype to bf16, or leave "
                              f"flash_attention out of MSLLM_KERNELS")
        # FlashAttentionScore(head_num, keep_prob, scale_value, pre_tokens, next_tokens, inner_precise,
        # input_layout, sparse_mode): head_num = N1 of the query (N2 of K/V divides it: GQA without repeating);
        # scale_value multiplies q k^T before the mask (our scaling, yarn's mscale^2 included for MLA); TND = tokens
        # of the flattened batch x heads x head_dim, cut into documents by actual_seq_qlen/kvlen (cumulative ends);
        # sparse_mode 3 = rightDownCausal inside each document, reading the compressed (2048, 2048) mask whose 1s
        # (above the diagonal) are the discarded positions. pre/next_tokens are ignored in mode 3.
        self.flash_attention = FlashAttentionScore(num_heads, 1.0, scaling, 2147483647, 0, 0, "TND", 3)
        self.causal_mask = (Tensor(np.triu(np.ones((FLASH_CAUSAL_MASK_SIZE,) * 2, np.uint8), 1)) if self.flash
                            else None)
        self.q_transpose = P.Transpose()
        self.k_transpose = P.Transpose()
        self.v_transpose = P.Transpose()
        self.pad_value = P.Concat(-1)

    def construct(self, query, key, value, mask):
        if self.flash:
            return self._flash(query, key, value, mask)
        return self.decomposed(query, key, value, mask)

    def decomposed(self, query, key, value, mask):
        """The decomposition (CPU, the numerical reference, and generation's cached path on every target): `mask`
        the additive (B or 1, 1, S, L) bias."""
        batch, heads, seq_len, _ = query.shape
        key = repeat_kv(self.repeat_kv, key, heads)
        value = repeat_kv(self.repeat_kv, value, heads)
        if self.explicit_broadcast:  # CPU: the scaling multiplies the queries, D / L as many elements as the scores
            query = self.scale(query, self.scaling)
        scores = self.qk_matmul(self.cast(query, self.compute_dtype), self.cast(key, self.compute_dtype))
        scores = self.cast(scores, ms.float32)
        if self.explicit_broadcast:
            if mask.shape != scores.shape:  # AttentionMask expands the training mask once; the cached path's is not
                mask = ops.broadcast_to(mask, scores.shape)
        else:  # a cluster's graph scales the fp32 scores: no extra rounding of 16-bit queries
            scores = self.scale(scores, self.scaling)
        scores = self.add_bias(scores, mask)
        probs = self.softmax(scores) if self.softmax_expanded_grad is None else self.softmax_expanded_grad(scores)
        probs = self.cast(probs, self.compute_dtype)
        out = self.cast(self.pv_matmul(probs, self.cast(value, self.compute_dtype)), self.activation_dtype)
        return self.merge_transpose(out, (0, 2, 1, 3)).reshape(batch, seq_len, -1)

    def _tnd(self, transpose, x):
        batch, heads, seq_len, dim = x.shape
        return transpose(self.cast(x, self.compute_dtype), (0, 2, 1, 3)).reshape(batch * seq_len, heads, dim)

    def _flash(self, query, key, value, document_ends):
        batch, heads, seq_len, dim = query.shape
        value_dim = value.shape[-1]
        if value_dim < dim:  # MLA: one head_dim for q, k and v (2.10's docs); zero columns give zero outputs
            value = self.pad_value((value, ops.zeros(value.shape[:-1] + (dim - value_dim,), value.dtype)))
        out = self.flash_attention(self._tnd(self.q_transpose, query), self._tnd(self.k_transpose, key),
                                   self._tnd(self.v_transpose, value), None, None, None, self.causal_mask, None,
                                   document_ends, document_ends)[3]
        if value_dim < dim:
            out = out[..., :value_dim]
        return self.cast(out.reshape(batch, seq_len, heads * value_dim), self.activation_dtype)


def write_cache(cache, new, start):
    """`cache` (B, h, L, d) with `new` (B, h, S, d) written at slots start .. start + S - 1; `start` is an int32
    scalar Tensor, so one compiled graph serves every decoding step (a gather and a select: static shapes)."""
    length, span = cache.shape[2], new.shape[2]
    offset = ops.arange(length, dtype=ms.int32) - start
    placed = ops.gather(new, ops.clip(offset, 0, span - 1), 2)
    inside = ops.logical_and(offset >= 0, offset < span).reshape(1, 1, length, 1)
    return ops.select(ops.broadcast_to(inside, cache.shape), placed.astype(cache.dtype), cache)


class GroupedQueryAttention(nn.Cell):
    """Attention with num_key_value_heads <= num_attention_heads (Qwen2: q/k/v bias; Qwen3: per-head q/k RMSNorm)."""

    def __init__(self, hidden_size: int, num_attention_heads: int, num_key_value_heads: int, head_dim: int,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool, rms_norm_eps: float,
                 precision: Precision, init_std: float):
        super().__init__()
        self.num_heads = num_attention_heads
        self.num_kv_heads = num_key_value_heads
        self.head_dim = head_dim
        self.q_proj = Linear(hidden_size, num_attention_heads * head_dim, qkv_bias, precision, init_std)
        self.k_proj = Linear(hidden_size, num_key_value_heads * head_dim, qkv_bias, precision, init_std)
        self.v_proj = Linear(hidden_size, num_key_value_heads * head_dim, qkv_bias, precision, init_std)
        self.o_proj = Linear(num_attention_heads * head_dim, hidden_size, o_bias, precision, init_std)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps, precision) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, rms_norm_eps, precision) if qk_norm else None
        self.rotary = ApplyRotary(head_dim, precision)
        self.attention = DotProductAttention(num_attention_heads, head_dim ** -0.5, precision)
        self.transpose = P.Transpose()

    def _heads(self, x, num_heads, norm):
        batch, seq_len, _ = x.shape
        x = x.reshape(batch, seq_len, num_heads, self.head_dim)
        if norm is not None:  # Qwen3 normalises each head before rope
            x = norm(x)
        return self.transpose(x, (0, 2, 1, 3))

    def _project(self, hidden, cos, sin):
        query = self.rotary(self._heads(self.q_proj(hidden), self.num_heads, self.q_norm), cos, sin)
        key = self.rotary(self._heads(self.k_proj(hidden), self.num_kv_heads, self.k_norm), cos, sin)
        value = self._heads(self.v_proj(hidden), self.num_kv_heads, None)
        return query, key, value

    def construct(self, hidden, cos, sin, mask):
        query, key, value = self._project(hidden, cos, sin)
        return self.o_proj(self.attention(query, key, value, mask))

    def cache_shapes(self, batch: int, length: int) -> tuple[tuple[int, ...], ...]:
        """The cache of one layer: keys and values after rope, (B, num_key_value_heads, L, head_dim) each."""
        return ((batch, self.num_kv_heads, length, self.head_dim),) * 2

    def construct_cached(self, hidden, cos, sin, bias, cache, start):
        """Generation: the S new positions' keys and values written into ``cache`` = (keys, values) at slots
        start .., then attention over the whole cache (``bias`` from ``AttentionMask.for_cache``)."""
        query, key, value = self._project(hidden, cos, sin)
        keys, values = write_cache(cache[0], key, start), write_cache(cache[1], value, start)
        # the decomposed core: the cache's additive bias is not flash attention's document ends
        return self.o_proj(self.attention.decomposed(query, keys, values, bias)), (keys, values)


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)): the Qwen MLP, DeepSeek's dense and shared-expert MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, precision: Precision, init_std: float):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, False, precision, init_std)
        self.up_proj = Linear(hidden_size, intermediate_size, False, precision, init_std)
        self.down_proj = Linear(intermediate_size, hidden_size, False, precision, init_std)
        self.silu = SiLU()
        self.mul = P.Mul()
        self.fused = precision.kernels.swiglu
        self.stack = P.Stack(-2)
        self.swiglu = Swiglu()

    def construct(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.fused:
            # Swiglu(input, dim): silu(first half of dim) * second half. Gate and up stacked on a new axis -2 are
            # the halves, and tensor parallel's split of the intermediate (last) axis leaves each half whole.
            hidden = self.swiglu(self.stack((gate, up)), -2).reshape(gate.shape)
        else:
            hidden = self.mul(self.silu(gate), up)
        return self.down_proj(hidden)


class DecoderLayer(nn.Cell):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + mlp(norm(h)). The family picks attn and mlp."""

    def __init__(self, hidden_size: int, rms_norm_eps: float, self_attn: nn.Cell, mlp: nn.Cell,
                 precision: Precision):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps, precision)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps, precision)
        self.mlp = mlp
        self.attn_residual = P.Add()
        self.mlp_residual = P.Add()

    def construct(self, x, cos, sin, mask):
        h = self.attn_residual(x, self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return self._mlp_block(h)

    def construct_cached(self, x, cos, sin, bias, cache, start):
        attended, cache = self.self_attn.construct_cached(self.input_layernorm(x), cos, sin, bias, cache, start)
        return self._mlp_block(self.attn_residual(x, attended)), cache

    def _mlp_block(self, h):
        return self.mlp_residual(h, self.mlp(self.post_attention_layernorm(h)))


class DecoderModel(nn.Cell):
    """Embedding, decoder layers, final norm; named like Hugging Face's ``model.*`` so checkpoints map 1:1."""

    def __init__(self, vocab_size: int, hidden_size: int, rms_norm_eps: float, layers: list[nn.Cell],
                 rotary_emb: RotaryEmbedding, precision: Precision, init_std: float, num_heads: int):
        super().__init__()
        self.embed_tokens = Embedding(vocab_size, hidden_size, precision, init_std)
        self.layers = nn.CellList(layers)
        self.norm = RMSNorm(hidden_size, rms_norm_eps, precision)
        self.rotary_emb = rotary_emb
        self.attention_mask = AttentionMask(precision, num_heads)

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        batch, seq_len = input_ids.shape
        if position_ids is None:
            position_ids = ops.arange(seq_len).reshape(1, seq_len).broadcast_to((batch, seq_len))
        cos, sin = self.rotary_emb(position_ids)
        mask = self.attention_mask(attention_mask, batch, seq_len)
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask)
        return self.norm(hidden)

    def construct_cached(self, input_ids, position_ids, key_mask, start, caches):
        """Hidden states of S new tokens at cache slots start .., and every layer's cache with them written in.
        ``key_mask`` (B, L) marks the slots that hold tokens (0 = prompt padding), ``caches`` one per layer."""
        cos, sin = self.rotary_emb(position_ids)
        bias = self.attention_mask.for_cache(key_mask, start, input_ids.shape[1])
        hidden = self.embed_tokens(input_ids)
        written = ()
        for index in range(len(self.layers)):
            hidden, cache = self.layers[index].construct_cached(hidden, cos, sin, bias, caches[index], start)
            written += (cache,)
        return self.norm(hidden), written


class LMHead(nn.Cell):
    """Hidden states to fp32 logits; with tied embeddings the embedding matrix is passed in as the weight."""

    def __init__(self, hidden_size: int, vocab_size: int, tied: bool, precision: Precision, init_std: float):
        super().__init__()
        self.compute_dtype = precision.compute_dtype
        self.weight = (None if tied else
                       Parameter(initializer(Normal(init_std), (vocab_size, hidden_size), precision.param_dtype),
                                 name="weight"))
        self.matmul = P.MatMul(transpose_b=True)
        self.cast = P.Cast()

    def construct(self, hidden, tied_weight):
        weight = tied_weight if self.weight is None else self.weight
        batch, seq_len, hidden_size = hidden.shape
        flat = self.cast(hidden, self.compute_dtype).reshape(-1, hidden_size)
        logits = self.matmul(flat, self.cast(weight, self.compute_dtype))
        return self.cast(logits, ms.float32).reshape(batch, seq_len, -1)


class CausalLMLoss(nn.Cell):
    """Token cross-entropy of logits[:, t] against labels[:, t + 1], skipping IGNORE_INDEX, as transformers'
    ForCausalLMLoss. Returns (sum of token losses, number of counted tokens) so that callers can average over
    several micro-batches exactly."""

    def __init__(self, precision: Precision | None = None):
        super().__init__()
        self.reduce_max = P.ReduceMax(keep_dims=True)
        self.sub = P.Sub()
        self.exp = P.Exp()
        self.reduce_sum = P.ReduceSum(keep_dims=True)
        self.log = P.Log()
        self.gather = P.GatherD()
        self.concat = P.Concat(1)
        self.log_softmax = P.LogSoftmax(-1)
        # CPU: LogSoftmax's kernel, which keeps no (tokens, vocab) intermediate beside its output (the decomposition
        # keeps the shifted logits and their expanded row max: 0.5 GB at 2048 x 32000). The cluster's graph keeps
        # the decomposition, whose reductions the plan splits along a vocab-parallel axis (LogSoftmax's cannot be).
        self.cpu_kernel = (precision or Precision()).explicit_broadcast

    def construct(self, logits, labels):
        batch, _, vocab = logits.shape
        ignore = ops.full((batch, 1), IGNORE_INDEX, dtype=labels.dtype)
        targets = self.concat((labels[:, 1:], ignore)).reshape(-1)
        logits = logits.reshape(-1, vocab)
        counted = targets != IGNORE_INDEX
        safe_targets = ops.select(counted, targets, ops.zeros_like(targets)).astype(ms.int32).reshape(-1, 1)
        if self.cpu_kernel:
            token_loss = -self.gather(self.log_softmax(logits), 1, safe_targets).reshape(-1)
        else:
            shifted = self.sub(logits, ops.stop_gradient(self.reduce_max(logits, -1)))
            log_normaliser = self.log(self.reduce_sum(self.exp(shifted), -1))
            token_loss = (log_normaliser - self.gather(shifted, 1, safe_targets)).reshape(-1)
        weights = counted.astype(ms.float32)
        return (token_loss * weights).sum(), weights.sum()


class CausalLM(nn.Cell):
    """``model(input_ids, attention_mask=None, position_ids=None)`` -> fp32 logits (B, S, V);
    ``model.loss(input_ids, labels, ...)`` -> mean token loss (what training differentiates)."""

    # Parameters that hold per-step statistics, not weights (a family lists their name suffixes): they stay out of
    # model directories and exported checkpoints.
    STATISTICS_SUFFIXES: tuple[str, ...] = ()

    def __init__(self, config, model: DecoderModel, precision: Precision):
        super().__init__()
        self.config = config
        self.precision = precision
        self.model = model
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, config.tie_word_embeddings, precision,
                              config.initializer_range)
        self.loss_fn = CausalLMLoss(precision)

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        return self.head(self.model(input_ids, attention_mask, position_ids))

    def head(self, hidden):
        """fp32 logits (B, S, V) of final hidden states (B, S, hidden)."""
        return self.lm_head(hidden, self.model.embed_tokens.weight)

    def cache_shapes(self, batch: int, length: int) -> list[tuple[tuple[int, ...], ...]]:
        """Per layer, the shapes of its generation cache for `batch` rows of `length` slots."""
        return [layer.self_attn.cache_shapes(batch, length) for layer in self.model.layers]

    def construct_cached(self, input_ids, position_ids, key_mask, start, caches):
        """Generation: fp32 logits (B, 1, V) of the last of the S new tokens at slots start .., and the caches
        with their keys and values written in (``DecoderModel.construct_cached``)."""
        hidden, caches = self.model.construct_cached(input_ids, position_ids, key_mask, start, caches)
        return self.head(hidden[:, -1:]), caches

    def weights(self) -> list[Parameter]:
        """The parameters a model checkpoint holds: everything but the statistics buffers."""
        return [p for p in self.get_parameters() if not p.name.endswith(self.STATISTICS_SUFFIXES)]

    def checkpoint_arrays(self, arrays=None):
        """(checkpoint tensor name, fp32 array) in the Hugging Face layout, the inverse of loading: of the weights,
        or of `arrays` ((parameter name, array) pairs laid out like the parameters, e.g. their AdamW moments)."""
        if arrays is None:
            arrays = ((param.name, param.asnumpy()) for param in self.weights())
        for name, array in arrays:
            yield name, np.array(array, dtype=np.float32, order="C")

    def checkpoint_sources(self, name: str) -> list[str]:
        """The checkpoint tensors weight `name` is read from: the tensor of the same name (a family whose Cells
        stack several checkpoint tensors into one parameter lists one per index of its first dimension)."""
        return [name]

    def ignored_checkpoint_tensors(self, names: set[str]) -> set[str]:
        """Of checkpoint tensors no weight reads, those that are errors (the rest are skipped on purpose)."""
        return {name for name in names if not name.endswith(NON_PARAMETER_SUFFIXES)}

    def loss_sum(self, input_ids, labels, attention_mask=None, position_ids=None):
        """(sum of token losses, counted tokens): the form gradient accumulation averages exactly."""
        return self.loss_fn(self.construct(input_ids, attention_mask, position_ids), labels)

    def loss(self, input_ids, labels, attention_mask=None, position_ids=None):
        total, count = self.loss_sum(input_ids, labels, attention_mask, position_ids)
        return total / ops.maximum(count, 1.0)

"""Layers every family shares: linear, RMSNorm, rotary embeddings (default/linear/dynamic/yarn), the attention
mask, dot-product attention, grouped-query attention, the SwiGLU MLP, the decoder skeleton and the LM loss.

Precision policy: parameters live in ``param_dtype``; matmuls run in ``compute_dtype``; the activations between
them (residual stream, MLP and rope products) are kept in ``activation_dtype`` (the compute dtype for O2, fp32
for O1); norms, rotary tables, softmax and the loss run in fp32. Ops that a parallel plan may split are primitive instances (``P.MatMul()``...) so
that ``mindspore_llm.parallel.plan`` can give each its strategy; the model code never decides a split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.ops import operations as P
from mindspore.ops.auto_generate.gen_ops_prim import SiLU

from mindspore_llm.models.config import RopeConfig

DTYPES = {"fp32": ms.float32, "float32": ms.float32, "fp16": ms.float16, "float16": ms.float16,
          "bf16": ms.bfloat16, "bfloat16": ms.bfloat16}

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Precision:
    param_dtype: ms.dtype = ms.float32
    compute_dtype: ms.dtype = ms.float32
    activation_dtype: ms.dtype | None = None  # None: the compute dtype

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

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x = self.cast(x, self.compute_dtype).reshape(-1, self.in_features)
        y = self.matmul(x, self.cast(self.weight, self.compute_dtype))
        if self.bias is not None:
            y = self.bias_add(y, self.cast(self.bias, self.compute_dtype))
        return self.cast(y, self.activation_dtype).reshape(out_shape)


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
        self.square = P.Square()
        self.mean = P.ReduceMean(keep_dims=True)
        self.rsqrt = P.Rsqrt()
        self.add_eps = P.Add()
        self.mul = P.Mul()
        self.mul_weight = P.Mul()
        self.cast = P.Cast()

    def construct(self, x):
        dtype = x.dtype
        x32 = self.cast(x, ms.float32)
        variance = self.mean(self.square(x32), -1)
        normed = self.mul(x32, self.rsqrt(self.add_eps(variance, self.eps)))
        return self.mul_weight(self.cast(normed, dtype), self.cast(self.weight, dtype))


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

    def __init__(self, dim: int):
        super().__init__()
        self.half = dim // 2
        self.mul_cos = P.Mul()
        self.mul_sin = P.Mul()
        self.add = P.Add()
        self.neg = P.Neg()
        self.concat = P.Concat(-1)
        self.cast = P.Cast()

    def construct(self, x, cos, sin):
        dtype = x.dtype
        x = self.cast(x, ms.float32)
        x1 = x[..., :self.half]
        x2 = x[..., self.half:]
        rotated = self.concat((self.neg(x2), x1))
        out = self.add(self.mul_cos(x, cos.expand_dims(1)), self.mul_sin(rotated, sin.expand_dims(1)))
        return self.cast(out, dtype)


class AttentionMask(nn.Cell):
    """Additive fp32 bias (B, 1, S, S): 0 where query i may see key j, the float32 minimum elsewhere.

    ``attention_mask`` is Hugging Face's 0/1 padding mask or, for packed sequences, document ids (0 = padding):
    key j is visible to query i when j <= i, j is not padding, and both belong to the same document.
    """

    def __init__(self):
        super().__init__()
        self.min_value = float(np.finfo(np.float32).min)

    def construct(self, attention_mask, seq_len: int):
        rows = ops.arange(seq_len).reshape(seq_len, 1)
        cols = ops.arange(seq_len).reshape(1, seq_len)
        allowed = (cols <= rows).reshape(1, 1, seq_len, seq_len)
        if attention_mask is not None:
            doc = attention_mask.astype(ms.int32)
            query_doc = doc.reshape(doc.shape[0], 1, seq_len, 1)
            key_doc = doc.reshape(doc.shape[0], 1, 1, seq_len)
            allowed = ops.logical_and(allowed, ops.logical_and(query_doc == key_doc, key_doc != 0))
        return ops.select(allowed, ops.zeros(allowed.shape, ms.float32),
                          ops.full(allowed.shape, self.min_value, dtype=ms.float32))


class DotProductAttention(nn.Cell):
    """softmax(q k^T * scaling + bias) v over (B, heads, S, dim); scores and softmax in fp32."""

    def __init__(self, scaling: float, precision: Precision):
        super().__init__()
        self.scaling = scaling
        self.compute_dtype = precision.compute_dtype
        self.activation_dtype = precision.activations
        self.qk_matmul = P.BatchMatMul(transpose_b=True)
        self.scale = P.Mul()
        self.add_bias = P.Add()
        self.softmax = P.Softmax(-1)
        self.pv_matmul = P.BatchMatMul()
        self.cast = P.Cast()

    def construct(self, query, key, value, bias):
        scores = self.qk_matmul(self.cast(query, self.compute_dtype), self.cast(key, self.compute_dtype))
        scores = self.cast(scores, ms.float32)
        scores = self.add_bias(self.scale(scores, self.scaling), bias)
        probs = self.cast(self.softmax(scores), self.compute_dtype)
        return self.cast(self.pv_matmul(probs, self.cast(value, self.compute_dtype)), self.activation_dtype)


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
        self.rotary = ApplyRotary(head_dim)
        self.attention = DotProductAttention(head_dim ** -0.5, precision)
        self.transpose = P.Transpose()
        self.merge_transpose = P.Transpose()
        self.repeat_kv = P.Tile()

    def _heads(self, x, num_heads, norm):
        batch, seq_len, _ = x.shape
        x = x.reshape(batch, seq_len, num_heads, self.head_dim)
        if norm is not None:  # Qwen3 normalises each head before rope
            x = norm(x)
        return self.transpose(x, (0, 2, 1, 3))

    def _expand_kv(self, x):
        groups = self.num_heads // self.num_kv_heads
        if groups == 1:
            return x
        batch, _, seq_len, dim = x.shape
        x = self.repeat_kv(x.expand_dims(2), (1, 1, groups, 1, 1))
        return x.reshape(batch, self.num_heads, seq_len, dim)

    def construct(self, hidden, cos, sin, bias):
        batch, seq_len, _ = hidden.shape
        query = self.rotary(self._heads(self.q_proj(hidden), self.num_heads, self.q_norm), cos, sin)
        key = self.rotary(self._heads(self.k_proj(hidden), self.num_kv_heads, self.k_norm), cos, sin)
        value = self._heads(self.v_proj(hidden), self.num_kv_heads, None)
        out = self.attention(query, self._expand_kv(key), self._expand_kv(value), bias)
        out = self.merge_transpose(out, (0, 2, 1, 3)).reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.o_proj(out)


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)): the Qwen MLP, DeepSeek's dense and shared-expert MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, precision: Precision, init_std: float):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, False, precision, init_std)
        self.up_proj = Linear(hidden_size, intermediate_size, False, precision, init_std)
        self.down_proj = Linear(intermediate_size, hidden_size, False, precision, init_std)
        self.silu = SiLU()
        self.mul = P.Mul()

    def construct(self, x):
        return self.down_proj(self.mul(self.silu(self.gate_proj(x)), self.up_proj(x)))


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

    def construct(self, x, cos, sin, bias):
        h = self.attn_residual(x, self.self_attn(self.input_layernorm(x), cos, sin, bias))
        return self.mlp_residual(h, self.mlp(self.post_attention_layernorm(h)))


class DecoderModel(nn.Cell):
    """Embedding, decoder layers, final norm; named like Hugging Face's ``model.*`` so checkpoints map 1:1."""

    def __init__(self, vocab_size: int, hidden_size: int, rms_norm_eps: float, layers: list[nn.Cell],
                 rotary_emb: RotaryEmbedding, precision: Precision, init_std: float):
        super().__init__()
        self.embed_tokens = Embedding(vocab_size, hidden_size, precision, init_std)
        self.layers = nn.CellList(layers)
        self.norm = RMSNorm(hidden_size, rms_norm_eps, precision)
        self.rotary_emb = rotary_emb
        self.attention_mask = AttentionMask()

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        batch, seq_len = input_ids.shape
        if position_ids is None:
            position_ids = ops.arange(seq_len).reshape(1, seq_len).broadcast_to((batch, seq_len))
        cos, sin = self.rotary_emb(position_ids)
        bias = self.attention_mask(attention_mask, seq_len)
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, bias)
        return self.norm(hidden)


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

    def __init__(self):
        super().__init__()
        self.reduce_max = P.ReduceMax(keep_dims=True)
        self.sub = P.Sub()
        self.exp = P.Exp()
        self.reduce_sum = P.ReduceSum(keep_dims=True)
        self.log = P.Log()
        self.gather = P.GatherD()
        self.concat = P.Concat(1)

    def construct(self, logits, labels):
        batch, _, vocab = logits.shape
        ignore = ops.full((batch, 1), IGNORE_INDEX, dtype=labels.dtype)
        targets = self.concat((labels[:, 1:], ignore)).reshape(-1)
        logits = logits.reshape(-1, vocab)
        counted = targets != IGNORE_INDEX
        safe_targets = ops.select(counted, targets, ops.zeros_like(targets)).astype(ms.int32)
        row_max = ops.stop_gradient(self.reduce_max(logits, -1))
        shifted = self.sub(logits, row_max)
        log_normaliser = self.log(self.reduce_sum(self.exp(shifted), -1))
        picked = self.gather(shifted, 1, safe_targets.reshape(-1, 1))
        token_loss = (log_normaliser - picked).reshape(-1)
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
        self.loss_fn = CausalLMLoss()

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.model(input_ids, attention_mask, position_ids)
        return self.lm_head(hidden, self.model.embed_tokens.weight)

    def weights(self) -> list[Parameter]:
        """The parameters a model checkpoint holds: everything but the statistics buffers."""
        return [p for p in self.get_parameters() if not p.name.endswith(self.STATISTICS_SUFFIXES)]

    def checkpoint_arrays(self):
        """(checkpoint tensor name, fp32 array) in the Hugging Face layout, the inverse of loading."""
        for param in self.weights():
            yield param.name, np.array(param.asnumpy(), dtype=np.float32, order="C")

    def loss_sum(self, input_ids, labels, attention_mask=None, position_ids=None):
        """(sum of token losses, counted tokens): the form gradient accumulation averages exactly."""
        return self.loss_fn(self.construct(input_ids, attention_mask, position_ids), labels)

    def loss(self, input_ids, labels, attention_mask=None, position_ids=None):
        total, count = self.loss_sum(input_ids, labels, attention_mask, position_ids)
        return total / ops.maximum(count, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek-V2/V3: multi-head latent attention and DeepSeekMoE (https://arxiv.org/abs/2412.19437)


class MultiHeadLatentAttention(nn.Cell):
    """MLA: queries from an optional low-rank path, keys/values from one compressed latent per token.

    q = q_proj(x) or q_b_proj(norm(q_a_proj(x))), split per head into (nope, rope) parts; the latent
    kv_a_proj_with_mqa(x) = [c_kv, k_rope]; k_rope is one rotary key shared by all heads; kv_b_proj(norm(c_kv))
    gives every head's (k_nope, v). ``rope_interleave``: the checkpoints store rotary pairs interleaved
    (x0, x1), (x2, x3)...; de-interleaving both q and k before the half-split rotation is what the reference does.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, attention_bias: bool,
                 rope_interleave: bool, scaling: float, precision: Precision, init_std: float):
        super().__init__()
        self.num_heads = num_attention_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.rope_interleave = rope_interleave
        q_out = num_attention_heads * self.qk_head_dim
        if q_lora_rank is None:
            self.q_proj = Linear(hidden_size, q_out, False, precision, init_std)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(hidden_size, q_lora_rank, attention_bias, precision, init_std)
            # The reference builds both latent norms with the default eps (1e-6), not config.rms_norm_eps.
            self.q_a_layernorm = RMSNorm(q_lora_rank, 1e-6, precision)
            self.q_b_proj = Linear(q_lora_rank, q_out, False, precision, init_std)
        self.kv_a_proj_with_mqa = Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, attention_bias, precision,
                                         init_std)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, 1e-6, precision)
        self.kv_b_proj = Linear(kv_lora_rank, num_attention_heads * (qk_nope_head_dim + v_head_dim), False,
                                precision, init_std)
        self.o_proj = Linear(num_attention_heads * v_head_dim, hidden_size, attention_bias, precision, init_std)
        self.rotary = ApplyRotary(qk_rope_head_dim)
        self.attention = DotProductAttention(scaling, precision)
        self.q_transpose = P.Transpose()
        self.kv_transpose = P.Transpose()
        self.merge_transpose = P.Transpose()
        self.q_concat = P.Concat(-1)
        self.k_concat = P.Concat(-1)
        self.broadcast_k_rope = P.Tile()
        self.deinterleave_concat = P.Concat(-1)

    def _deinterleave(self, x):
        if not self.rope_interleave:
            return x
        return self.deinterleave_concat((x[..., 0::2], x[..., 1::2]))

    def construct(self, hidden, cos, sin, bias):
        batch, seq_len, _ = hidden.shape
        if self.q_proj is not None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = self.q_transpose(q.reshape(batch, seq_len, self.num_heads, self.qk_head_dim), (0, 2, 1, 3))
        q_nope = q[..., :self.qk_nope_head_dim]
        q_rope = self.rotary(self._deinterleave(q[..., self.qk_nope_head_dim:]), cos, sin)

        latent = self.kv_a_proj_with_mqa(hidden)
        c_kv = self.kv_a_layernorm(latent[..., :self.kv_lora_rank])
        k_rope = latent[..., self.kv_lora_rank:].reshape(batch, 1, seq_len, self.qk_rope_head_dim)
        k_rope = self.rotary(self._deinterleave(k_rope), cos, sin)

        kv = self.kv_b_proj(c_kv).reshape(batch, seq_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        kv = self.kv_transpose(kv, (0, 2, 1, 3))
        key = self.k_concat((kv[..., :self.qk_nope_head_dim],
                             self.broadcast_k_rope(k_rope, (1, self.num_heads, 1, 1))))
        value = kv[..., self.qk_nope_head_dim:]
        query = self.q_concat((q_nope, q_rope))
        out = self.attention(query, key, value, bias)
        out = self.merge_transpose(out, (0, 2, 1, 3)).reshape(batch, seq_len, self.num_heads * self.v_head_dim)
        return self.o_proj(out)


class GroupLimitedTopKRouter(nn.Cell):
    """DeepSeek-V3 routing ("gate"): sigmoid affinities; the correction bias shifts them for *selection only*;
    experts are picked among the ``topk_group`` groups with the largest sum of their top-2 biased scores.
    The weights are the unbiased scores of the picked experts, optionally renormalised, times
    ``routed_scaling_factor``. Routing runs in fp32, as in the reference.

    ``e_score_correction_bias`` is a buffer (no gradient): ``update_expert_bias`` moves it between steps.
    """

    def __init__(self, hidden_size: int, n_routed_experts: int, num_experts_per_tok: int, n_group: int,
                 topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float, precision: Precision,
                 init_std: float):
        super().__init__()
        self.num_experts = n_routed_experts
        self.top_k = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = Parameter(initializer(Normal(init_std), (n_routed_experts, hidden_size), precision.param_dtype),
                                name="weight")
        self.e_score_correction_bias = Parameter(initializer("zeros", (n_routed_experts,), ms.float32),
                                                 name="e_score_correction_bias", requires_grad=False)
        self.matmul = P.MatMul(transpose_b=True)
        self.sigmoid = P.Sigmoid()
        self.add_bias = P.Add()
        self.group_top2 = P.TopK(sorted=True)
        self.group_topk = P.TopK(sorted=True)
        self.expert_topk = P.TopK(sorted=True)
        self.group_one_hot = P.OneHot()
        self.gather = P.GatherD()
        self.cast = P.Cast()
        self.min_value = float(np.finfo(np.float32).min)

    def construct(self, x):
        """x (T, hidden) -> (weights (T, top_k) fp32, expert indices (T, top_k) int32, scores (T, E) fp32)."""
        tokens = x.shape[0]
        logits = self.matmul(self.cast(x, ms.float32), self.cast(self.weight, ms.float32))
        scores = self.sigmoid(logits)
        choice = ops.stop_gradient(self.add_bias(scores, self.e_score_correction_bias))
        if self.n_group > 1:
            grouped = choice.reshape(tokens, self.n_group, self.num_experts // self.n_group)
            group_scores = self.group_top2(grouped, 2)[0].sum(-1)
            group_index = self.group_topk(group_scores, self.topk_group)[1]
            group_mask = self.group_one_hot(group_index, self.n_group, Tensor(1.0, ms.float32),
                                            Tensor(0.0, ms.float32)).sum(1)
            expert_mask = group_mask.reshape(tokens, self.n_group, 1).broadcast_to(grouped.shape)
            choice = ops.select(expert_mask.reshape(tokens, self.num_experts) > 0, choice,
                                ops.full(choice.shape, self.min_value, dtype=ms.float32))
        indices = self.expert_topk(choice, self.top_k)[1]
        weights = self.gather(scores, 1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


class StackedExperts(nn.Cell):
    """All routed SwiGLU experts as stacked weights with the expert dimension first — gate/up (E, I, H), down
    (E, H, I) — computed with batched matmuls over that dimension, which ``expert_parallel`` splits.

    Dense dropless dispatch: every expert runs on every token and the outputs are summed with the (mostly zero)
    per-token combine weights (T, E). Exact and static-shaped (compiles in graph mode, nothing dropped), at
    E / top_k times the FLOPs of a sparse dispatch; see docs/deepseek_v3.md.
    """

    def __init__(self, n_routed_experts: int, hidden_size: int, moe_intermediate_size: int, precision: Precision,
                 init_std: float):
        super().__init__()
        self.num_experts = n_routed_experts
        self.compute_dtype = precision.compute_dtype
        shape_in = (n_routed_experts, moe_intermediate_size, hidden_size)
        shape_out = (n_routed_experts, hidden_size, moe_intermediate_size)
        self.gate_proj = Parameter(initializer(Normal(init_std), shape_in, precision.param_dtype), name="gate_proj")
        self.up_proj = Parameter(initializer(Normal(init_std), shape_in, precision.param_dtype), name="up_proj")
        self.down_proj = Parameter(initializer(Normal(init_std), shape_out, precision.param_dtype), name="down_proj")
        self.broadcast_tokens = P.Tile()
        self.gate_matmul = P.BatchMatMul(transpose_b=True)
        self.up_matmul = P.BatchMatMul(transpose_b=True)
        self.down_matmul = P.BatchMatMul(transpose_b=True)
        self.silu = SiLU()
        self.mul = P.Mul()
        self.weigh = P.Mul()
        self.combine = P.ReduceSum()
        self.transpose = P.Transpose()
        self.cast = P.Cast()

    def construct(self, x, combine_weights):
        """x (T, H), combine_weights (T, E) -> sum_e combine_weights[:, e] * expert_e(x), (T, H)."""
        tokens, hidden = x.shape
        x = self.broadcast_tokens(self.cast(x, self.compute_dtype).reshape(1, tokens, hidden),
                                  (self.num_experts, 1, 1))
        gate = self.gate_matmul(x, self.cast(self.gate_proj, self.compute_dtype))
        up = self.up_matmul(x, self.cast(self.up_proj, self.compute_dtype))
        out = self.down_matmul(self.mul(self.silu(gate), up), self.cast(self.down_proj, self.compute_dtype))
        weights = self.cast(self.transpose(combine_weights, (1, 0)), self.compute_dtype).reshape(
            self.num_experts, tokens, 1)
        return self.combine(self.weigh(out, weights), 0)


class AuxLossGradient(nn.Cell):
    """Identity on `output` whose backward also sends gradient 1 into `aux_loss`: the auxiliary loss joins the
    gradient of the loss without changing what layers return (Megatron's MoEAuxLossAutoScaler)."""

    def construct(self, output, aux_loss):
        return output

    def bprop(self, output, aux_loss, out, dout):
        return dout, ops.ones_like(aux_loss)


class DeepSeekMoE(nn.Cell):
    """Shared experts + routed experts: y = shared(x) + sum_k w_k expert_{i_k}(x) (dropless).

    ``tokens_per_expert`` adds up how many (token, slot) assignments each expert received since the last
    ``update_expert_bias`` (which resets it), and after every call
    ``aux_loss`` the sequence-wise balance loss (0 when ``aux_loss_alpha`` is 0): buffers for the bias update and
    the training log.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int, n_shared_experts: int,
                 router: GroupLimitedTopKRouter, aux_loss_alpha: float, precision: Precision, init_std: float):
        super().__init__()
        self.num_experts = n_routed_experts
        self.top_k = router.top_k
        self.aux_loss_alpha = aux_loss_alpha
        self.gate = router
        self.experts = StackedExperts(n_routed_experts, hidden_size, moe_intermediate_size, precision, init_std)
        self.shared_experts = (SwiGLU(hidden_size, moe_intermediate_size * n_shared_experts, precision, init_std)
                               if n_shared_experts > 0 else None)
        self.tokens_per_expert = Parameter(initializer("zeros", (n_routed_experts,), ms.float32),
                                           name="tokens_per_expert", requires_grad=False)
        self.aux_loss = Parameter(initializer("zeros", (), ms.float32), name="aux_loss", requires_grad=False)
        self.one_hot = P.OneHot()
        self.add_shared = P.Add()
        self.aux_gradient = AuxLossGradient()

    def _sequence_aux_loss(self, scores, assignments, batch: int):
        """alpha * sum_i f_i P_i per sequence, averaged over sequences (DeepSeek-V3 eqs. 17-20):
        f_i = E / (K T) * tokens routed to i, P_i = mean over tokens of the normalised affinity s_i / sum_j s_j."""
        scores = scores.reshape(batch, -1, self.num_experts)
        seq_len = scores.shape[1]
        fraction = ops.stop_gradient(assignments.reshape(batch, seq_len, self.num_experts).sum(1)) * (
            self.num_experts / (self.top_k * seq_len))
        probability = (scores / (scores.sum(-1, keepdims=True) + 1e-20)).mean(1)
        return self.aux_loss_alpha * (fraction * probability).sum(-1).mean()

    def construct(self, x):
        batch, seq_len, hidden = x.shape
        flat = x.reshape(-1, hidden)
        routing = self.gate(flat)  # (weights, indices, scores); scores are read only for the aux loss
        weights, indices = routing[0], routing[1]
        one_hot = self.one_hot(indices, self.num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        assignments = one_hot.sum(1)  # (T, E), 0/1
        combine_weights = (one_hot * weights.expand_dims(-1)).sum(1)
        # summed over calls until update_expert_bias resets it: every micro-batch of an accumulated step counts
        ops.assign_add(self.tokens_per_expert, ops.stop_gradient(assignments.sum(0)))
        out = self.experts(flat, combine_weights)
        if self.aux_loss_alpha > 0:
            aux = self._sequence_aux_loss(routing[2], assignments, batch)
            ops.assign(self.aux_loss, ops.stop_gradient(aux))
            out = self.aux_gradient(out, aux)
        out = out.astype(x.dtype).reshape(batch, seq_len, hidden)
        if self.shared_experts is not None:
            out = self.add_shared(out, self.shared_experts(x))
        return out

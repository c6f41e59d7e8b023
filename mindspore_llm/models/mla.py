"""Multi-head latent attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1): keys and values from one
compressed latent per token, queries from an optional low-rank path, rotary position on a decoupled part of each
head."""
from __future__ import annotations

from mindspore import nn
from mindspore.ops import operations as P

from mindspore_llm.models.layers import ApplyRotary, DotProductAttention, Linear, Precision, RMSNorm, write_cache


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
        self.rotary = ApplyRotary(qk_rope_head_dim, precision)
        self.attention = DotProductAttention(num_attention_heads, scaling, precision)
        self.q_transpose = P.Transpose()
        self.kv_transpose = P.Transpose()
        self.q_concat = P.Concat(-1)
        self.k_concat = P.Concat(-1)
        self.broadcast_k_rope = P.Tile()
        self.deinterleave_concat = P.Concat(-1)

    def _deinterleave(self, x):
        if not self.rope_interleave:
            return x
        return self.deinterleave_concat((x[..., 0::2], x[..., 1::2]))

    def _queries(self, hidden, cos, sin):
        batch, seq_len, _ = hidden.shape
        if self.q_proj is not None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = self.q_transpose(q.reshape(batch, seq_len, self.num_heads, self.qk_head_dim), (0, 2, 1, 3))
        q_rope = self.rotary(self._deinterleave(q[..., self.qk_nope_head_dim:]), cos, sin)
        return self.q_concat((q[..., :self.qk_nope_head_dim], q_rope))

    def _latent(self, hidden, cos, sin):
        """What a token leaves for later ones: the normalised c_kv (B, 1, S, kv_lora_rank) and the rotated shared
        key k_rope (B, 1, S, qk_rope_head_dim) -- all that generation caches (kv_lora_rank + qk_rope_head_dim
        numbers per token and layer)."""
        batch, seq_len, _ = hidden.shape
        latent = self.kv_a_proj_with_mqa(hidden)
        c_kv = self.kv_a_layernorm(latent[..., :self.kv_lora_rank]).reshape(batch, 1, seq_len, self.kv_lora_rank)
        k_rope = latent[..., self.kv_lora_rank:].reshape(batch, 1, seq_len, self.qk_rope_head_dim)
        return c_kv, self.rotary(self._deinterleave(k_rope), cos, sin)

    def _attend(self, query, c_kv, k_rope, mask, cached=False):
        """Every head's keys and values expanded from the latents of the attended positions, then attention (the
        decomposed core when `cached`)."""
        batch = query.shape[0]
        keys_len = c_kv.shape[2]
        kv = self.kv_b_proj(c_kv.reshape(batch, keys_len, self.kv_lora_rank))
        kv = self.kv_transpose(kv.reshape(batch, keys_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim),
                               (0, 2, 1, 3))
        key = self.k_concat((kv[..., :self.qk_nope_head_dim],
                             self.broadcast_k_rope(k_rope, (1, self.num_heads, 1, 1))))
        value = kv[..., self.qk_nope_head_dim:]
        if cached:
            return self.o_proj(self.attention.decomposed(query, key, value, mask))
        return self.o_proj(self.attention(query, key, value, mask))

    def construct(self, hidden, cos, sin, mask):
        c_kv, k_rope = self._latent(hidden, cos, sin)
        return self._attend(self._queries(hidden, cos, sin), c_kv, k_rope, mask)

    def cache_shapes(self, batch: int, length: int) -> tuple[tuple[int, ...], ...]:
        """The cache of one layer: the latent, not per-head keys and values (DeepSeek-V2 section 2.1.2)."""
        return (batch, 1, length, self.kv_lora_rank), (batch, 1, length, self.qk_rope_head_dim)

    def construct_cached(self, hidden, cos, sin, bias, cache, start):
        """Generation: the new positions' latents written into ``cache`` = (c_kv, k_rope) at slots start ..; keys
        and values are expanded from the whole cache every step (kv_b_proj over L latents: simple, and exact
        with adapters on kv_b_proj; the absorbed form of the paper would skip that expansion). The core runs
        decomposed: the cache's additive ``bias`` is not flash attention's document ends."""
        c_kv, k_rope = self._latent(hidden, cos, sin)
        c_kv, k_rope = write_cache(cache[0], c_kv, start), write_cache(cache[1], k_rope, start)
        return self._attend(self._queries(hidden, cos, sin), c_kv, k_rope, bias, cached=True), (c_kv, k_rope)

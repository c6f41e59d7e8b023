"""DeepSeekMoE (DeepSeek-V3 section 2.1.2): group-limited sigmoid routing with a selection-only correction bias,
stacked routed experts, shared experts, and the auxiliary losses of expert balance."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.ops import operations as P
from mindspore.ops.auto_generate.gen_ops_prim import SiLU

from mindspore_llm.models.layers import Precision, SwiGLU


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

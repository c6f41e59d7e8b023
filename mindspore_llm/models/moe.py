"""DeepSeekMoE (DeepSeek-V3 section 2.1.2): group-limited sigmoid routing with a selection-only correction bias,
stacked routed experts, shared experts, the sequence-wise balance loss and the aux-loss-free bias update.

How tokens reach their experts (``moe_dispatch``; evaluation and generation always take a dropless path):

- ``capacity`` (training default; GShard, Switch Transformer): within each sequence of S tokens an expert takes at
  most C = min(S, ceil(capacity_factor * S * k / E)) of the token-slots routed to it, chosen by routing weight
  (``probability``) or by position; the rest are dropped (counted in ``dropped_slots``; the shared experts and the
  residual still carry those tokens). The kept tokens are gathered into a (B, E, C, H) buffer, the experts run as
  batched matmuls on (E, B*C, H), and their outputs are gathered back per token-slot and weighted. Shapes are fixed
  (graph mode); under expert parallelism the two transposes between the (B, E, C, H) and (E, B, C, H) layouts are
  where the plan's strategies make the compiler insert the all-to-alls. C = S drops nothing.
- ``dense``: every expert on every token, summed with the (mostly zero) routing weights: exact and dropless, at
  E / k times the expert FLOPs and (E, T, H) activations. What evaluation uses unless the dispatch is ``grouped``.
- ``grouped`` (Ascend only; dropless, training and evaluation): tokens sorted by expert (``ops.moe_token_permute``),
  the experts as grouped matmuls over the sorted rows, weighted back (``ops.moe_token_unpermute``).
"""
from __future__ import annotations

from collections.abc import Callable

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.ops import operations as P
from mindspore.ops.auto_generate.gen_ops_prim import SiLU
from mindspore.ops.functional_overload import gmm

from mindspore_llm.checkpoint import layer_index
from mindspore_llm.models.layers import Precision, SwiGLU
from mindspore_llm.models.shapes import expert_capacity


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
    (E, H, I) — which ``expert_parallel`` splits. ``construct`` runs expert e on row block e of an (E, N, H) input
    as batched matmuls; ``grouped`` runs them on expert-sorted rows (Ascend's grouped matmul)."""

    def __init__(self, n_routed_experts: int, hidden_size: int, moe_intermediate_size: int, precision: Precision,
                 init_std: float):
        super().__init__()
        self.compute_dtype = precision.compute_dtype
        shape_in = (n_routed_experts, moe_intermediate_size, hidden_size)
        shape_out = (n_routed_experts, hidden_size, moe_intermediate_size)
        self.gate_proj = Parameter(initializer(Normal(init_std), shape_in, precision.param_dtype), name="gate_proj")
        self.up_proj = Parameter(initializer(Normal(init_std), shape_in, precision.param_dtype), name="up_proj")
        self.down_proj = Parameter(initializer(Normal(init_std), shape_out, precision.param_dtype), name="down_proj")
        self.gate_matmul = P.BatchMatMul(transpose_b=True)
        self.up_matmul = P.BatchMatMul(transpose_b=True)
        self.down_matmul = P.BatchMatMul(transpose_b=True)
        self.silu = SiLU()
        self.mul = P.Mul()
        self.cast = P.Cast()

    def construct(self, x):
        """x (E, N, H) in the compute dtype -> (E, N, H): row block e through expert e."""
        gate = self.gate_matmul(x, self.cast(self.gate_proj, self.compute_dtype))
        up = self.up_matmul(x, self.cast(self.up_proj, self.compute_dtype))
        return self.down_matmul(self.mul(self.silu(gate), up), self.cast(self.down_proj, self.compute_dtype))

    def grouped(self, rows, group_sizes):
        """rows (N, H) sorted by expert, group_sizes (E,) int64 rows per expert -> (N, H). Ascend only.

        MindSpore 2.10 ``ops.functional_overload.gmm(x, weight, bias=None, group_list=None, group_type=0,
        group_list_type=0)``: x and weight are 1-tuples; group_type 0 splits the rows (m) of x (m, k) and multiplies
        group i by weight[i] (k, n), so the weights go in as (E, H, I) / (E, I, H), i.e. ours transposed;
        group_list_type 1 means group_list holds each group's size (0: cumulative ends); int64; autodiff only
        with group_type 0 and no bias (what this uses)."""
        weight_in = (0, 2, 1)
        gate = gmm([rows], [self.cast(self.gate_proj, self.compute_dtype).transpose(weight_in)],
                   group_list=group_sizes, group_type=0, group_list_type=1)[0]
        up = gmm([rows], [self.cast(self.up_proj, self.compute_dtype).transpose(weight_in)],
                 group_list=group_sizes, group_type=0, group_list_type=1)[0]
        down = self.cast(self.down_proj, self.compute_dtype).transpose(weight_in)
        return gmm([self.mul(self.silu(gate), up)], [down], group_list=group_sizes, group_type=0,
                   group_list_type=1)[0]


class DenseDispatch(nn.Cell):
    """Every expert on every token: x (T, H) broadcast to (E, T, H); outputs summed with the (T, E) routing
    weights, which are zero outside each token's top-k. Exact and dropless."""

    def __init__(self, num_experts: int, precision: Precision):
        super().__init__()
        self.num_experts = num_experts
        self.compute_dtype = precision.compute_dtype
        self.broadcast_tokens = P.Tile()
        self.transpose = P.Transpose()
        self.weigh = P.Mul()
        self.combine_sum = P.ReduceSum()
        self.cast = P.Cast()

    def construct(self, x):
        """x (T, H) -> expert inputs (E, T, H)."""
        tokens, hidden = x.shape
        return self.broadcast_tokens(self.cast(x, self.compute_dtype).reshape(1, tokens, hidden),
                                     (self.num_experts, 1, 1))

    def combine(self, expert_outputs, routing_weights):
        """expert outputs (E, T, H), routing weights (T, E) -> sum_e weight[:, e] * output[e], (T, H)."""
        tokens = routing_weights.shape[0]
        weights = self.cast(self.transpose(routing_weights, (1, 0)), self.compute_dtype).reshape(
            self.num_experts, tokens, 1)
        return self.combine_sum(self.weigh(expert_outputs, weights), 0)


class CapacityDispatch(nn.Cell):
    """Per sequence, each expert keeps at most C of its token-slots, ranked by ``drop_policy``: ``probability``
    (the routing weight, highest first; ties to the earlier token) or ``position`` (earlier tokens first).

    Each expert's candidates are sorted once by that key (unassigned tokens last); the first C sorted tokens fill
    its C slots (unused slots hold an unassigned token whose output nothing reads, so it gets no gradient), and the
    inverse of the sort gives every (token, expert) pair its rank, which says which slot the token's output is read
    back from (rank < C) or that it was dropped."""

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float, drop_policy: str,
                 precision: Precision):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.by_position = drop_policy == "position"
        self.compute_dtype = precision.compute_dtype
        self.key_select = P.Select()
        self.key_transpose = P.Transpose()
        self.sort = P.TopK(sorted=True)
        self.invert = P.TopK(sorted=True)
        self.rank_transpose = P.Transpose()
        self.slot_gather = P.GatherD()
        self.dispatch_gather = P.Gather(batch_dims=1)
        self.to_experts = P.Transpose()
        self.from_experts = P.Transpose()
        self.combine_gather = P.Gather(batch_dims=1)
        self.weigh = P.Mul()
        self.combine_sum = P.ReduceSum()
        self.cast = P.Cast()

    def capacity(self, seq_len: int) -> int:
        return expert_capacity(seq_len, self.num_experts, self.top_k, self.capacity_factor)

    def construct(self, x, routing_weights, indices, weights):
        """x (B, S, H); routing_weights (T, E) (zero where not routed), indices and weights (T, k) of the router.

        -> (expert inputs (E, B*C, H), combine index (B, S*k) into each sequence's (E*C) slots, combine weights
        (B, S*k, 1): the routing weight where the slot was kept, 0 where dropped; kept slots (T, k) 0/1)."""
        batch, seq_len, hidden = x.shape
        experts, capacity = self.num_experts, self.capacity(seq_len)
        routed = routing_weights > 0
        if self.by_position:
            position = ops.arange(seq_len, 0, -1, dtype=ms.float32).reshape(1, seq_len, 1)
            key = position.broadcast_to((batch, seq_len, experts)).reshape(-1, experts)
        else:
            key = routing_weights
        key = self.key_select(routed, key, ops.full(key.shape, -1.0, dtype=ms.float32))
        key = self.key_transpose(key.reshape(batch, seq_len, experts), (0, 2, 1))  # (B, E, S)
        order = self.sort(key, seq_len)[1]  # each expert's tokens, highest key first
        rank = self.invert(-order.astype(ms.float32), seq_len)[1]  # the inverse permutation: each token's place
        slot_tokens = order[:, :, :capacity].reshape(batch, experts * capacity)
        dispatched = self.dispatch_gather(self.cast(x, self.compute_dtype), slot_tokens, 1)
        dispatched = self.to_experts(dispatched.reshape(batch, experts, capacity, hidden), (1, 0, 2, 3))
        token_rank = self.rank_transpose(rank, (0, 2, 1)).reshape(batch * seq_len, experts)
        slot = self.slot_gather(token_rank, 1, indices)  # (T, k): place of each token-slot in its expert's order
        kept = (slot < capacity).astype(ms.float32)
        combine_index = (indices * capacity + ops.minimum(slot, capacity - 1)).reshape(batch, seq_len * self.top_k)
        combine_weights = (weights * kept).reshape(batch, seq_len * self.top_k, 1)
        return (dispatched.reshape(experts, batch * capacity, hidden), combine_index, combine_weights,
                ops.stop_gradient(kept))

    def combine(self, expert_outputs, combine_index, combine_weights, seq_len: int):
        """expert outputs (E, B*C, H) -> (B*S, H): each token's kept slots, weighted and summed."""
        experts, rows, hidden = expert_outputs.shape
        capacity = self.capacity(seq_len)
        batch = rows // capacity
        outputs = self.from_experts(expert_outputs.reshape(experts, batch, capacity, hidden), (1, 0, 2, 3))
        picked = self.combine_gather(outputs.reshape(batch, experts * capacity, hidden), combine_index, 1)
        weighted = self.weigh(picked, self.cast(combine_weights, self.compute_dtype))
        return self.combine_sum(weighted.reshape(batch, seq_len, self.top_k, hidden), 2).reshape(-1, hidden)


class GroupedDispatch(nn.Cell):
    """Ascend only, dropless: the T*k token-slots sorted by expert, the experts as grouped matmuls over the
    sorted rows (``StackedExperts.grouped``), the outputs put back in token order and weighted.

    MindSpore 2.10 (``ops/auto_generate/gen_ops_def.py``): ``moe_token_permute(tokens (T, H), indices (T, k) int32)``
    -> (permuted (T*k, H) grouped by ascending expert id, sorted_indices (T*k,) int32 where entry t*k + j is the
    permuted row of token t's j-th slot); ``moe_token_unpermute(permuted (T*k, H), sorted_indices, probs (T, k))``
    -> (T, H) = sum_j probs[t, j] * permuted[sorted_indices[t*k + j]]. k <= 512 (the kernel's limit). The meaning
    of sorted_indices is read off the docstrings' examples (permute returns each token's output row, unpermute
    gathers by it); the kernels cannot run on CPU."""

    def __init__(self, num_experts: int, precision: Precision):
        super().__init__()
        self.num_experts = num_experts
        self.compute_dtype = precision.compute_dtype
        self.cast = P.Cast()

    def construct(self, x, indices):
        """x (T, H), indices (T, k) -> (expert-sorted rows (T*k, H), sorted_indices)."""
        return ops.moe_token_permute(self.cast(x, self.compute_dtype), indices)

    def combine(self, expert_outputs, sorted_indices, weights):
        # probs cast to the tokens' dtype: the docs do not say which dtype the kernel takes (unverified)
        return ops.moe_token_unpermute(expert_outputs, sorted_indices, self.cast(weights, self.compute_dtype))


class AuxLossGradient(nn.Cell):
    """Identity on `output` whose backward also sends `weight` into `aux_loss`: the balance loss joins the
    gradient with that weight without changing what layers return (Megatron's MoEAuxLossAutoScaler, with the
    weight read per step from a buffer instead of a global)."""

    def construct(self, output, aux_loss, weight):
        return output

    def bprop(self, output, aux_loss, weight, out, dout):
        return dout, weight, ops.zeros_like(weight)


class DeepSeekMoE(nn.Cell):
    """Shared experts + routed experts: y = shared(x) + sum_k w_k expert_{i_k}(x).

    Buffers (non-trainable, not model weights; the trainer reads and resets them between steps):
    ``tokens_per_expert`` (E,) the router's (token, slot) assignments and ``dropped_slots`` the slots the capacity
    dispatch dropped, both summed over calls since the last ``update_expert_bias``; ``aux_loss`` the last call's
    sequence-wise balance loss (0 when ``aux_loss_alpha`` is 0); ``aux_loss_multiplier`` d(objective)/d(one
    sequence's balance loss), set by whoever owns the objective (``DeepseekV3ForCausalLM.loss``: 1 / batch;
    ``TrainStep``: loss scale x data-parallel factor / sequences of the step), see ``set_aux_loss_multiplier``.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int, n_shared_experts: int,
                 router: GroupLimitedTopKRouter, *, dispatch: str, capacity_factor: float, drop_policy: str,
                 aux_loss_alpha: float, bias_update_speed: float, precision: Precision, init_std: float):
        super().__init__()
        self.num_experts = n_routed_experts
        self.top_k = router.top_k
        self.dispatch = dispatch
        self.aux_loss_alpha = aux_loss_alpha
        self.bias_update_speed = bias_update_speed
        self.gate = router
        self.experts = StackedExperts(n_routed_experts, hidden_size, moe_intermediate_size, precision, init_std)
        self.shared_experts = (SwiGLU(hidden_size, moe_intermediate_size * n_shared_experts, precision, init_std)
                               if n_shared_experts > 0 else None)
        self.dense = DenseDispatch(n_routed_experts, precision)
        self.capacity = (CapacityDispatch(n_routed_experts, self.top_k, capacity_factor, drop_policy, precision)
                         if dispatch == "capacity" else None)
        self.grouped = GroupedDispatch(n_routed_experts, precision) if dispatch == "grouped" else None
        self.tokens_per_expert = Parameter(initializer("zeros", (n_routed_experts,), ms.float32),
                                           name="tokens_per_expert", requires_grad=False)
        self.dropped_slots = Parameter(initializer("zeros", (), ms.float32), name="dropped_slots",
                                       requires_grad=False)
        self.aux_loss = Parameter(initializer("zeros", (), ms.float32), name="aux_loss", requires_grad=False)
        self.aux_loss_multiplier = Parameter(initializer("zeros", (), ms.float32), name="aux_loss_multiplier",
                                             requires_grad=False)
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

    def _routed(self, x, flat, weights, indices, routing_weights, assignments):
        """The routed experts' output (T, H) by the dispatch this mode uses."""
        if self.dispatch == "grouped":
            rows, sorted_indices = self.grouped(flat, indices)
            group_sizes = ops.stop_gradient(assignments.sum(0)).astype(ms.int64)
            return self.grouped.combine(self.experts.grouped(rows, group_sizes), sorted_indices, weights)
        if self.training and self.dispatch == "capacity":
            expert_inputs, combine_index, combine_weights, kept = self.capacity(x, routing_weights, indices, weights)
            ops.assign_add(self.dropped_slots, kept.size - kept.sum())
            return self.capacity.combine(self.experts(expert_inputs), combine_index, combine_weights, x.shape[1])
        return self.dense.combine(self.experts(self.dense(flat)), routing_weights)

    def construct(self, x):
        batch, seq_len, hidden = x.shape
        flat = x.reshape(-1, hidden)
        weights, indices, scores = self.gate(flat)  # scores are read only by the balance loss
        one_hot = self.one_hot(indices, self.num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        assignments = one_hot.sum(1)  # (T, E), 0/1
        routing_weights = (one_hot * weights.expand_dims(-1)).sum(1)  # (T, E), zero outside the top-k
        # summed over calls until update_expert_bias resets it: every micro-batch of an accumulated step counts
        ops.assign_add(self.tokens_per_expert, ops.stop_gradient(assignments.sum(0)))
        out = self._routed(x, flat, weights, indices, routing_weights, assignments)
        if self.aux_loss_alpha > 0:
            aux = self._sequence_aux_loss(scores, assignments, batch)
            ops.assign(self.aux_loss, ops.stop_gradient(aux))
            out = self.aux_gradient(out, aux, self.aux_loss_multiplier * batch)  # aux is the mean over the batch
        out = out.astype(x.dtype).reshape(batch, seq_len, hidden)
        if self.shared_experts is not None:
            out = self.add_shared(out, self.shared_experts(x))
        return out


# ---------------------------------------------------------------------------------------------------------------
# What the training step and the trainer do with the MoE layers.

def moe_blocks(model) -> list[tuple[str, DeepSeekMoE]]:
    return [(name, cell) for name, cell in model.cells_and_names() if isinstance(cell, DeepSeekMoE)]


def aux_loss_multipliers(model) -> ParameterTuple:
    """The ``aux_loss_multiplier`` buffer of every MoE layer of `model` that has a balance loss (alpha > 0); empty
    otherwise, and then there is nothing to set."""
    return ParameterTuple([block.aux_loss_multiplier for _, block in moe_blocks(model) if block.aux_loss_alpha > 0])


def set_aux_loss_multiplier(multipliers: ParameterTuple, value):
    """In a compiled graph, before the forward pass: d(objective)/d(one sequence's balance loss) = `value` for
    every MoE layer. Each layer's balance loss is a mean over its batch, so its gradient weight becomes
    value * batch; summed over micro-batches (and a pipeline's slices of them) the loss counts once per sequence
    of the step."""
    for multiplier in multipliers:
        ops.assign(multiplier, value)
    return value


def update_expert_bias(model, gamma: float | None = None, all_reduce: Callable[[np.ndarray], np.ndarray] | None = None,
                       overflowed: bool = False) -> None:
    """After an optimizer step: b_i += γ·sign(mean load − load_i) for every MoE layer, from the token counts the
    layer summed since the previous update (all micro-batches of the step), which it then resets to zero
    (DeepSeek-V3 §2.1.2). γ defaults to each layer's ``bias_update_speed``. After an `overflowed` step (the
    optimizer skipped it) the counts are discarded and the biases stay, as the weights did.

    In DATA_PARALLEL mode each rank counts only its own tokens: pass `all_reduce` (summing an array over the
    data-parallel ranks) so every replica applies the same update. (Under semi-auto parallel the in-graph counts
    are already global.) Overflow is decided on the all-reduced gradients, so every rank skips alike."""
    for _, block in moe_blocks(model):
        load = block.tokens_per_expert.asnumpy()
        if not overflowed:
            if all_reduce is not None:
                load = all_reduce(load)
            speed = block.bias_update_speed if gamma is None else gamma
            bias = block.gate.e_score_correction_bias
            step = speed * np.sign(load.mean() - load)
            bias.set_data(ms.Tensor(bias.asnumpy() + step.astype(np.float32), ms.float32))
        block.tokens_per_expert.set_data(ms.Tensor(np.zeros(load.shape, np.float32)))
        block.dropped_slots.set_data(ms.Tensor(np.zeros((), np.float32)))


def expert_load_stats(model) -> dict[str, float]:
    """Per MoE layer, from the counts since the last bias update: max/mean expert load (1.0 = perfectly even), the
    token-slots the capacity dispatch dropped (``dropped_slots``) and their fraction of all routed slots, and the
    last sequence-wise balance loss when enabled. Keys ``moe/<layer index>/<stat>`` (``moe/<stat>`` for a lone MoE
    block)."""
    stats = {}
    for name, block in moe_blocks(model):
        layer = layer_index(name + ".")
        prefix = f"moe/{layer}/" if layer is not None else f"moe/{name + '/' if name else ''}"
        load = block.tokens_per_expert.asnumpy()
        dropped = float(block.dropped_slots.asnumpy())
        stats[prefix + "max_over_mean_load"] = float(load.max() / max(load.mean(), 1e-12))
        stats[prefix + "dropped_slots"] = dropped
        stats[prefix + "dropped_fraction"] = dropped / max(float(load.sum()), 1.0)
        if block.aux_loss_alpha > 0:
            stats[prefix + "aux_loss"] = float(block.aux_loss.asnumpy())
    return stats

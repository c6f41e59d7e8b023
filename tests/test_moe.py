"""The DeepSeekMoE dispatches and what the training step, the trainer and the planner do with them (fp32, graph
mode on CPU).

References: the dense (every expert on every token) dispatch, itself matched against transformers in
tests/test_deepseek_v3.py; an independent NumPy implementation of the capacity policy and of the layer written
here from the formulas; ``model.loss`` on the concatenated batch for the accumulated step (its balance loss matched
against torch in tests/test_deepseek_v3.py).
"""
import dataclasses
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from mindspore_llm.common import ConfigError
from mindspore_llm.models.auto import build_model
from mindspore_llm.models.deepseek_v3 import DeepseekV3Config
from mindspore_llm.models.layers import Precision
from mindspore_llm.models.moe import DeepSeekMoE, GroupLimitedTopKRouter, expert_load_stats, update_expert_bias
from mindspore_llm.models.shapes import expert_capacity, routed_slots_per_token
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.memory import moe_layer_activation_bytes
from mindspore_llm.parallel.plan import apply_plan, validate_plan
from mindspore_llm.train.step import PrecisionConfig, TrainStep

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 32, 16, 8, 2
BATCH, SEQ = 3, 16
# a 2-layer model (dense, then MoE) for the plan, the planner and the grouped path
TINY = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1)


def make_block(dispatch: str, capacity_factor: float = 1.25, drop_policy: str = "probability") -> DeepSeekMoE:
    """A DeepSeekMoE layer (8 experts in 4 groups, top-2 of the best 2, one shared expert) with fixed random
    weights and correction bias, so that every block built here computes the same function."""
    precision = Precision()
    router = GroupLimitedTopKRouter(HIDDEN, EXPERTS, TOP_K, 4, 2, True, 2.5, precision, 0.02)
    block = DeepSeekMoE(HIDDEN, INTERMEDIATE, EXPERTS, 1, router, dispatch=dispatch, capacity_factor=capacity_factor,
                        drop_policy=drop_policy, aux_loss_alpha=0.0, bias_update_speed=0.01, precision=precision,
                        init_std=0.02)
    rng = np.random.default_rng(0)
    for param in block.trainable_params():
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.3))
    block.gate.e_score_correction_bias.set_data(Tensor(rng.standard_normal(EXPERTS).astype(np.float32) * 0.1))
    return block


def block_inputs(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)


def output_and_gradients(block, x: np.ndarray):
    """The block's output and the gradients of sum(output * R) (R fixed random) w.r.t. x and every weight."""
    probe = Tensor(np.random.default_rng(2).standard_normal(x.shape).astype(np.float32))
    weights = block.trainable_params()

    def objective(inputs):
        return (block(inputs) * probe).sum()

    inputs = Tensor(x)
    out = block(inputs).asnumpy()
    grads = ms.value_and_grad(objective, 0, weights)(inputs)[1]
    return out, {"x": grads[0].asnumpy(), **{p.name: g.asnumpy() for p, g in zip(weights, grads[1])}}


def test_capacity_that_drops_nothing_equals_the_dense_dispatch():
    """capacity_factor = E / k gives C = S: nothing is dropped, and output and every gradient (input, router,
    experts, shared expert) equal the dense dispatch. Measured: max |Δ| 0 (output), <= 1.0e-7 relative (gradients)."""
    dense = make_block("dense")
    capacity = make_block("capacity", capacity_factor=EXPERTS / TOP_K).set_train(True)
    x = block_inputs()
    dense_out, dense_grads = output_and_gradients(dense, x)
    out, grads = output_and_gradients(capacity, x)
    assert expert_capacity(SEQ, EXPERTS, TOP_K, EXPERTS / TOP_K) == SEQ
    assert float(capacity.dropped_slots.asnumpy()) == 0
    np.testing.assert_allclose(out, dense_out, rtol=0, atol=1e-6 * np.abs(dense_out).max())
    assert sorted(grads) == sorted(dense_grads)
    for name, ref in dense_grads.items():
        error = np.abs(grads[name] - ref).max()
        assert error <= 1e-6 * np.abs(ref).max(), (name, error)


def test_grouped_dispatch_compiles_up_to_the_ascend_kernels():
    """The Ascend-only grouped path (moe_token_permute, grouped matmuls, moe_token_unpermute) passes MindSpore's
    type and shape inference, forward and backward, and stops at kernel selection on CPU: the argument conventions
    are accepted; the kernels themselves are unproven here."""
    one_layer = dataclasses.replace(TINY, num_hidden_layers=1, first_k_dense_replace=0, moe_dispatch="grouped")
    model = build_model(one_layer).set_train(True)
    ids = Tensor(np.random.default_rng(0).integers(0, 128, (2, 8)).astype(np.int32))
    params = model.trainable_params()

    def loss(input_ids):
        return model.loss(input_ids, input_ids)

    with pytest.raises(RuntimeError, match=r"Unsupported op \[MoeTokenPermute\] on CPU"):
        ms.value_and_grad(loss, None, params)(ids)


# -- the capacity policy against NumPy ---------------------------------------------------------------------------

def numpy_kept(indices: np.ndarray, weights: np.ndarray, capacity: int, policy: str) -> np.ndarray:
    """(B, S, k) 0/1: per sequence and expert, the first `capacity` token-slots routed to it by the policy —
    highest routing weight first (ties: earlier token) or earliest token first."""
    kept = np.zeros(indices.shape, np.float32)
    for b in range(indices.shape[0]):
        for e in range(EXPERTS):
            slots = [(s, j) for s in range(indices.shape[1]) for j in range(indices.shape[2]) if indices[b, s, j] == e]
            if policy == "probability":
                slots.sort(key=lambda slot: (-weights[b, slot[0], slot[1]], slot[0]))
            for s, j in slots[:capacity]:
                kept[b, s, j] = 1
    return kept


def numpy_block(block, x: np.ndarray, indices: np.ndarray, weights: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """shared(x) + sum over kept slots of weight * expert(x), from the block's weights."""
    def silu(v):
        return v / (1 + np.exp(-v))

    gate, up, down = (getattr(block.experts, n).asnumpy() for n in ("gate_proj", "up_proj", "down_proj"))
    shared = {n: getattr(block.shared_experts, n).weight.asnumpy() for n in ("gate_proj", "up_proj", "down_proj")}
    out = (silu(x @ shared["gate_proj"].T) * (x @ shared["up_proj"].T)) @ shared["down_proj"].T
    for b, s, j in zip(*np.nonzero(kept)):
        e, token = indices[b, s, j], x[b, s]
        expert = (silu(gate[e] @ token) * (up[e] @ token)) @ down[e].T
        out[b, s] += weights[b, s, j] * expert
    return out


@pytest.fixture(scope="module", params=["probability", "position"])
def tight(request):
    """A block whose experts take C = ceil(0.5 * 16 * 2 / 8) = 2 token-slots per sequence (about half dropped),
    its routing of `x` and the NumPy policy's kept slots."""
    block = make_block("capacity", capacity_factor=0.5, drop_policy=request.param).set_train(True)
    x = block_inputs()
    weights, indices, _ = (t.asnumpy() for t in block.gate(Tensor(x.reshape(-1, HIDDEN))))
    shape = (BATCH, SEQ, TOP_K)
    capacity = expert_capacity(SEQ, EXPERTS, TOP_K, 0.5)
    kept = numpy_kept(indices.reshape(shape), weights.reshape(shape), capacity, request.param)
    return block, x, indices.reshape(shape), weights.reshape(shape), kept


def test_tight_capacity_keeps_the_slots_the_policy_keeps(tight):
    block, x, indices, weights, kept = tight
    routing = np.zeros((BATCH * SEQ, EXPERTS), np.float32)
    np.put_along_axis(routing, indices.reshape(-1, TOP_K), weights.reshape(-1, TOP_K), 1)
    dispatched = block.capacity(Tensor(x), Tensor(routing), Tensor(indices.reshape(-1, TOP_K)),
                                Tensor(weights.reshape(-1, TOP_K)))
    assert 0.3 < 1 - kept.mean() < 0.7  # a real fraction dropped
    np.testing.assert_array_equal(dispatched[3].asnumpy().reshape(kept.shape), kept)


def test_tight_capacity_layer_equals_numpy_and_counts_the_drops(tight):
    """The layer's output equals the NumPy layer on the kept slots (shared expert on every token), and
    ``dropped_slots`` / ``dropped_fraction`` count the dropped token-slots. Measured max |Δ| 5.7e-6 of max 21-23."""
    block, x, indices, weights, kept = tight
    update_expert_bias(block, gamma=0.0)  # zero the counts left by other tests of this block
    out = block(Tensor(x)).asnumpy()
    expected = numpy_block(block, x, indices, weights, kept)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    stats = expert_load_stats(block)
    assert stats["moe/dropped_slots"] == kept.size - kept.sum()
    assert stats["moe/dropped_fraction"] == pytest.approx(1 - kept.mean())


def test_bias_update_skips_an_overflowed_step(tight):
    """After a step the optimizer skipped, the counts are discarded and the biases stay; the next step updates."""
    block, x, *_ = tight
    block(Tensor(x))
    bias = block.gate.e_score_correction_bias.asnumpy().copy()
    update_expert_bias(block, overflowed=True)
    np.testing.assert_array_equal(block.gate.e_score_correction_bias.asnumpy(), bias)
    assert not block.tokens_per_expert.asnumpy().any() and float(block.dropped_slots.asnumpy()) == 0
    block(Tensor(x))
    update_expert_bias(block)
    assert np.abs(block.gate.e_score_correction_bias.asnumpy() - bias).max() == pytest.approx(0.01)


# -- the balance loss through the training step ------------------------------------------------------------------

class CaptureGradients(nn.Cell):
    """Stands in for AdamW in TrainStep: keeps the (unscaled) gradients it is given instead of applying them."""

    def __init__(self, params):
        super().__init__()
        self.parameters = ParameterTuple(params)
        self.grads = ParameterTuple([Parameter(np.zeros(p.shape, np.float32), name=f"captured.{p.name}",
                                               requires_grad=False) for p in params])
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, finite):
        return ops.depend(finite, self.hyper_map(ops.assign, self.grads, grads))


def test_balance_loss_gradient_through_accumulated_fp16_scaled_step_equals_the_concatenated_batch():
    """TrainStep with 2 micro-batches (different token counts) and a fixed loss scale of 1024: the unscaled
    gradient of every weight equals d(model.loss)/dw on the concatenated batch, mean token loss + balance loss
    (alpha 0.5) averaged over all 4 sequences. Measured: <= 2.3e-7 relative (the router weight). The defect this
    fixes (the backward sent 1 per call: summed over the micro-batches, then divided by the loss scale) gave the
    balance loss 1/512 of its weight here; a multiplier without the loss scale fails too (checked)."""
    config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                              num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=0,
                              seq_aux_loss_alpha=0.5)
    ms.set_seed(0)
    model = build_model(config).set_train(True)
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, 64, (4, 12)).astype(np.int32)
    mask = np.ones((4, 12), np.int32)
    mask[1, :5], mask[2, :2] = 0, 0  # micro-batch 1 counts 16 label tokens, micro-batch 2 counts 19
    labels = np.where(mask == 1, input_ids, -100).astype(np.int32)
    params = model.trainable_params()
    capture = CaptureGradients(params)
    step = TrainStep(model, capture, PrecisionConfig(level="O0", loss_scale="fixed", initial_scale=1024.0),
                     accumulation_steps=2)
    step(Tensor(input_ids), Tensor(labels), Tensor(mask))

    def loss(ids, lab, attn):
        return model.loss(ids, lab, attn)

    ref_grads = ms.value_and_grad(loss, None, params)(Tensor(input_ids), Tensor(labels), Tensor(mask))[1]
    for param, captured, ref in zip(params, capture.grads, ref_grads):
        ref = ref.asnumpy()
        error = np.abs(captured.asnumpy() - ref).max()
        assert error <= 2e-6 * np.abs(ref).max(), (param.name, error, np.abs(ref).max())


# -- config, plan, planner, FLOPs --------------------------------------------------------------------------------

def test_dispatch_fields_are_validated():
    for bad, field in (({"moe_dispatch": "sparse"}, "moe_dispatch"),
                       ({"moe_capacity_factor": 0}, "moe_capacity_factor"),
                       ({"moe_drop_policy": "random"}, "moe_drop_policy")):
        with pytest.raises(ConfigError, match=field):
            dataclasses.replace(TINY, **bad).validate()


def test_plan_splits_the_capacity_buffers_over_expert_parallel():
    """Sequences are dispatched on their data-parallel device; the experts take (E, B*C, H) split (ep, dp / ep)
    and hand it back in that layout: the two layout changes are the all-to-alls."""
    model = build_model(TINY)
    apply_plan(model, ParallelConfig(data_parallel=4, expert_parallel=2))
    mlp = model.model.layers[1].mlp
    assert mlp.capacity.dispatch_gather.in_strategy == ((4, 1, 1), (4, 1))
    assert mlp.capacity.to_experts.in_strategy == ((4, 1, 1, 1),)
    assert mlp.experts.gate_matmul.in_strategy == ((2, 2, 1), (2, 1, 1))
    assert mlp.capacity.from_experts.in_strategy == ((2, 2, 1, 1),)
    assert mlp.capacity.combine_gather.in_strategy == ((4, 1, 1), (4, 1))
    grouped = dataclasses.replace(TINY, moe_dispatch="grouped")
    with pytest.raises(ConfigError, match="moe_dispatch 'grouped' runs whole experts"):
        validate_plan(grouped, ParallelConfig(data_parallel=4, expert_parallel=2), 4)


def test_planner_and_flops_count_the_capacity_not_every_expert():
    """MoE activations per layer and executed FLOPs follow the rows the dispatch runs: E*C/S per token with a
    capacity (C = ceil(1.25 * 64 * 2 / 8) = 20 of 64 tokens: 2.5 rows per token), E dense, k grouped."""
    from mindspore_llm.flops import executed_flops_per_token, flops_per_token

    seq, batch, e = 64, 2, 2
    tokens, h, i = seq * batch, 64, 32
    assert routed_slots_per_token(TINY, seq) == 8 * 20 / 64
    expected = {"capacity": 2.5, "dense": 8.0, "grouped": 2.0}
    for dispatch, rows_per_token in expected.items():
        config = dataclasses.replace(TINY, moe_dispatch=dispatch)
        combined = 8 * tokens if dispatch == "dense" else 2 * tokens
        router = 4 * tokens * 8 * (3 + 2 + (3 if dispatch == "capacity" else 0))
        hand = rows_per_token * tokens * e * (h + 4 * i) + combined * e * h + router + 4 * e * tokens * i
        assert moe_layer_activation_bytes(config, seq, batch, e, 1) == hand, dispatch
        # routed experts: 3 matrices of 32 x 64 per expert in the one MoE layer
        routed = 3 * 32 * 64
        assert executed_flops_per_token(config, seq) - flops_per_token(config, seq) == pytest.approx(
            6 * routed * (rows_per_token - 2)), dispatch
    assert math.ceil(1.25 * 64 * 2 / 8) == 20

"""Backend-selected kernels (models/kernels.py): the CPU chooses the decomposition, Ascend the fused kernels; with
the Ascend choice forced, the models build, the plan gives the fused ops their strategies, and the training graph is
constructed on this CPU as far as it goes (MindIR export: shapes and types inferred, gradients built).

None of FlashAttentionScore, RmsNorm, RotaryPositionEmbedding and Swiglu has a CPU kernel in MindSpore 2.10
("Unsupported op [RmsNorm] on CPU" at kernel selection, in graph and PyNative mode alike), so no fused kernel is
compared numerically here. What surrounds flash attention is: the test swaps the kernel for a NumPy implementation
of its documented semantics (TND layout, cumulative actual_seq_qlen/kvlen, sparse_mode 3, scale_value, N1/N2 head
groups) and compares the model's logits with the decomposition's on packed and padded rows.
"""
import dataclasses
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from mindspore_llm.common import ConfigError
from mindspore_llm.models import layers
from mindspore_llm.models.auto import build_model
from mindspore_llm.models.config import config_from_hf
from mindspore_llm.models.deepseek_v3 import softmax_scale
from mindspore_llm.models.kernels import ENV, Kernels, select_kernels
from mindspore_llm.models.layers import AttentionMask, Precision, flash_segments
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.memory import Workload, attention_mask_bytes, layer_activation_bytes
from mindspore_llm.parallel.plan import apply_plan
from mindspore_llm.train.config import load_train_config
from mindspore_llm.train.rehearse import fused_graph_ops, rehearse
from tests import reference

ROOT = Path(__file__).resolve().parents[1]
ALL_FUSED_OPS = ["FlashAttentionScore", "FlashAttentionScoreGrad", "RmsNorm", "RmsNormGrad", "RotaryPositionEmbedding",
                 "RotaryPositionEmbeddingGrad", "Swiglu", "SwigluGrad"]

FUSED_16BIT = Precision(ms.float32, ms.float16, kernels=Kernels.all_fused())


def tiny(architecture: str, **overrides):
    dims = {"Qwen2ForCausalLM": reference.QWEN2, "Qwen3ForCausalLM": reference.QWEN3,
            "DeepseekV3ForCausalLM": reference.DEEPSEEK_V3}[architecture]
    return config_from_hf({"architectures": [architecture], **dims, **overrides})


def cells(model, cell_type):
    return [cell for _, cell in model.cells_and_names() if isinstance(cell, cell_type)]


def switches(model) -> dict[str, set[bool]]:
    return {"rms_norm": {c.fused for c in cells(model, layers.RMSNorm)},
            "rotary": {c.fused for c in cells(model, layers.ApplyRotary)},
            "flash_attention": {c.flash for c in cells(model, layers.DotProductAttention)}
            | {c.flash for c in cells(model, layers.AttentionMask)},
            "swiglu": {c.fused for c in cells(model, layers.SwiGLU)}}


# ---------------------------------------------------------------------------------------------------------------
# The selection


def test_the_cpu_chooses_the_decomposition_and_ascend_the_fused_kernels(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert ms.get_context("device_target") == "CPU"
    assert select_kernels() == select_kernels("CPU") == Kernels()
    assert select_kernels("Ascend") == Kernels(True, True, True, True)
    model = build_model(tiny("Qwen3ForCausalLM"))  # default precision: the device target's kernels
    assert switches(model) == dict.fromkeys(("rms_norm", "rotary", "flash_attention", "swiglu"), {False})


def test_msllm_kernels_overrides_the_device_target(monkeypatch):
    monkeypatch.setenv(ENV, "ascend")
    assert select_kernels("CPU") == Kernels.all_fused()
    monkeypatch.setenv(ENV, "cpu")
    assert select_kernels("Ascend") == Kernels()
    monkeypatch.setenv(ENV, "flash_attention, rms_norm")
    assert select_kernels("CPU") == Kernels(flash_attention=True, rms_norm=True)
    assert switches(build_model(tiny("Qwen2ForCausalLM"), Precision(ms.float32, ms.float16))) == {
        "rms_norm": {True}, "rotary": {False}, "flash_attention": {True}, "swiglu": {False}}
    monkeypatch.setenv(ENV, "flash")
    with pytest.raises(ConfigError, match=f"{ENV}: unknown kernel.*flash_attention, rms_norm, rotary, swiglu"):
        select_kernels()


def test_flash_attention_refuses_fp32_compute():
    with pytest.raises(ConfigError, match="float16 or bfloat16.*compute_dtype"):
        build_model(tiny("Qwen2ForCausalLM"), Precision(kernels=Kernels(flash_attention=True)))


# ---------------------------------------------------------------------------------------------------------------
# Flash attention's inputs: the documents' cumulative ends


def test_flash_mask_is_the_cumulative_ends_of_each_rows_documents():
    """Row 0: documents 1 and 2, then padding; row 1: left padding then one document (a 0/1 mask). K = 8 entries per
    row (S = 8, B = 2), unused ones repeating the row's end; row 1's ends are offset by S."""
    mask = AttentionMask(Precision(kernels=Kernels(flash_attention=True)))
    ids = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
    ends = mask(ms.Tensor(ids), 2, 8).asnumpy()
    np.testing.assert_array_equal(ends, [3, 5, 8, 8, 8, 8, 8, 8, 10, 16, 16, 16, 16, 16, 16, 16])
    assert ends.dtype == np.int64
    np.testing.assert_array_equal(mask(None, 2, 8).asnumpy(), [8, 16])  # no mask: one causal segment per row


def test_flash_segments_stay_within_the_kernels_2048_lengths():
    assert flash_segments(2, 8) == 8  # every token may be its own document
    assert flash_segments(1, 8192) == 2048
    assert flash_segments(4, 8192) == 512
    assert flash_segments(4096, 16) == 1
    assert flash_segments(128, 4096, batch_split=128) == 2048  # data parallel 128: one row per device
    model = build_model(tiny("Qwen2ForCausalLM"))
    apply_plan(model, ParallelConfig(data_parallel=4))
    assert model.model.attention_mask.batch_split == 4


# ---------------------------------------------------------------------------------------------------------------
# Flash attention's glue, against the decomposition, with the kernel replaced by its documented semantics


class FlashAttentionSemantics:
    """FlashAttentionScore as MindSpore 2.10 documents it, for TND and sparse_mode 3, in NumPy (fp32): each
    document [end_{i-1}, end_i) of the flattened tokens attends causally within itself; query head n reads K/V
    head n // (N1 / N2); scores are scale_value * q k^T; attn_mask 1 = discarded."""

    TND = ms.ops.auto_generate.gen_ops_prim.FlashAttentionScore(1, input_layout="TND").input_layout

    def __init__(self, primitive):
        self.primitive = primitive
        self.calls = []

    def __call__(self, query, key, value, real_shift, drop_mask, padding_mask, attn_mask, prefix, qlen, kvlen):
        prim = self.primitive
        assert (prim.input_layout, prim.sparse_mode, prim.next_tokens) == (self.TND, 3, 0)
        assert real_shift is None and drop_mask is None and padding_mask is None and prefix is None
        np.testing.assert_array_equal(attn_mask.asnumpy(), np.triu(np.ones((2048, 2048), np.uint8), 1))
        q, k, v = (x.astype(ms.float32).asnumpy() for x in (query, key, value))
        ends = qlen.asnumpy()
        np.testing.assert_array_equal(ends, kvlen.asnumpy())
        tokens, heads, _ = q.shape
        assert heads == prim.head_num and ends[-1] == tokens and np.all(np.diff(ends) >= 0)
        self.calls.append((q.shape, k.shape, v.shape))
        groups = heads // k.shape[1]
        out = np.zeros(q.shape[:2] + v.shape[2:], np.float32)
        for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
            if end == start:
                continue
            causal = np.tril(np.ones((end - start, end - start), bool))
            for n in range(heads):
                scores = prim.scale_value * q[start:end, n] @ k[start:end, n // groups].T
                scores = np.where(causal, scores, -np.inf)
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                out[start:end, n] = (probs / probs.sum(-1, keepdims=True)) @ v[start:end, n // groups]
        return None, None, None, ms.Tensor(out).astype(query.dtype)


def packed_batch(vocab: int):
    """Row 0: documents of 5 and 7 tokens, 4 padding tokens (document ids); row 1: 3 left-padding tokens, one
    document (a 0/1 mask). Positions restart in each document."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (2, 16)).astype(np.int32)
    documents = np.array([[1] * 5 + [2] * 7 + [0] * 4, [0] * 3 + [1] * 13], np.int32)
    positions = np.array([list(range(5)) + list(range(7)) + [0] * 4, [0] * 3 + list(range(13))], np.int32)
    return ids, documents, positions


@pytest.mark.parametrize("architecture, overrides", [
    ("Qwen2ForCausalLM", {}),  # GQA: 4 query heads on 2 K/V heads
    ("DeepseekV3ForCausalLM", {"first_k_dense_replace": 3}),  # MLA: v_head_dim 16 < qk 24, yarn mscale^2
], ids=["qwen2-gqa", "deepseek-mla-yarn"])
def test_flash_attention_glue_matches_the_decomposition(architecture, overrides):
    config = tiny(architecture, **overrides)
    decomposed = build_model(config, Precision(ms.float32, ms.float16, kernels=Kernels()))
    flash = build_model(config, Precision(ms.float32, ms.float16, kernels=Kernels(flash_attention=True)))
    rng = np.random.default_rng(1)
    for source, target in zip(decomposed.get_parameters(), flash.get_parameters()):
        if ".self_attn." in source.name and source.name.endswith("proj.weight"):  # sharp attention, not uniform
            source.set_data(ms.Tensor(rng.normal(0, 0.3, source.shape).astype(np.float32)))
        target.set_data(source.value().copy())
    cores = cells(flash, layers.DotProductAttention)
    kernels = [FlashAttentionSemantics(core.flash_attention) for core in cores]
    for core, kernel in zip(cores, kernels):
        object.__setattr__(core, "flash_attention", kernel)
    if architecture == "DeepseekV3ForCausalLM":  # the kernel's scale carries yarn's mscale^2 (0.1 ln 4 + 1)^2
        assert cores[0].flash_attention.primitive.scale_value == pytest.approx(
            24 ** -0.5 * (0.1 * np.log(4.0) + 1) ** 2, rel=1e-6) == softmax_scale(config)
    ids, documents, positions = (ms.Tensor(x) for x in packed_batch(config.vocab_size))
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the NumPy kernel runs eagerly
    try:
        want = decomposed(ids, documents, positions).asnumpy()
        got = flash(ids, documents, positions).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if architecture == "Qwen2ForCausalLM":  # K/V reach the kernel unrepeated
        assert kernels[0].calls[0] == ((32, heads, 16), (32, kv_heads, 16), (32, kv_heads, 16))
    else:  # V zero-padded to the q/k head_dim
        assert kernels[0].calls[0] == ((32, heads, 24), (32, heads, 24), (32, heads, 24))
    real = documents.asnumpy() != 0  # padding queries' outputs differ by design and are never trained on
    error = np.abs(got - want)[real].max() / np.abs(want[real]).max()
    # measured: 1.1e-3 (Qwen2) and 1.6e-3 (DeepSeek), fp16 compute on both sides; a 10% wrong scale gives 7e-2
    assert error < 1e-2, error


# ---------------------------------------------------------------------------------------------------------------
# With the Ascend kernels: the plan, and the training graph constructed on CPU


def test_the_plan_gives_the_fused_ops_their_strategies():
    model = build_model(tiny("Qwen3ForCausalLM", num_hidden_layers=1), FUSED_16BIT)
    applied = {op.path: op.strategy for op in apply_plan(model, ParallelConfig(data_parallel=2, model_parallel=2,
                                                                               recompute="selective"))}
    layer = "model.layers.0."
    assert applied[layer + "self_attn.attention.flash_attention"] == (
        (2, 2, 1), (2, 2, 1), (2, 2, 1), (1, 1), (2,), (2,))  # q, k, v (TND), causal mask, document ends
    assert applied[layer + "input_layernorm.rms_norm"] == ((2, 1, 1), (1,))
    assert applied[layer + "self_attn.q_norm.rms_norm"] == ((2, 1, 2, 1), (1,))  # per head, heads split
    assert applied[layer + "self_attn.rotary.rope"] == ((2, 2, 1, 1), (2, 1, 1, 1), (2, 1, 1, 1))
    assert applied[layer + "mlp.swiglu"] == ((2, 1, 1, 2),)
    assert not any(path.endswith(("qk_matmul", "softmax", "mul_cos", ".silu", ".square")) for path in applied)
    # selective recompute has no S x S scores to drop under flash attention: the core is not recomputed
    assert not cells(model, layers.DotProductAttention)[0]._has_config_recompute
    decomposed = build_model(tiny("Qwen3ForCausalLM", num_hidden_layers=1))
    apply_plan(decomposed, ParallelConfig(recompute="selective"))
    assert cells(decomposed, layers.DotProductAttention)[0]._has_config_recompute


@pytest.mark.parametrize("architecture, overrides", [
    ("Qwen3ForCausalLM", {"num_hidden_layers": 1}),  # GQA with q/k head norms
    ("DeepseekV3ForCausalLM", {"num_hidden_layers": 2}),  # MLA, one dense and one MoE layer (shared-expert SwiGLU)
], ids=["qwen3", "deepseek-v3"])
def test_the_fused_training_graph_is_constructed(architecture, overrides, tmp_path):
    model = build_model(tiny(architecture, **overrides), FUSED_16BIT)
    apply_plan(model, ParallelConfig())
    ids, documents, positions = (ms.Tensor(x) for x in packed_batch(model.config.vocab_size))
    found = fused_graph_ops(model, (ids, ids, documents, positions), tmp_path)
    assert found == ALL_FUSED_OPS


def test_rehearse_reports_the_kernels_a_cluster_run_uses(monkeypatch):
    """The tiny SFT job with the Ascend kernels forced (and 16-bit compute, which flash attention needs): the
    rehearsal names every kernel, constructs the toy's fused training graph, and runs its steps decomposed."""
    monkeypatch.setenv(ENV, "ascend")
    config = load_train_config(ROOT / "configs" / "tiny_qwen_sft.yaml",
                               ["precision.level=O2", "precision.compute_dtype=fp16"])
    result = rehearse(config, "tiny_qwen_sft.yaml", steps=1, echo=lambda line: None)
    report = "\n".join(result.lines)
    assert result.ok, report
    for line in Kernels.all_fused().describe():
        assert f"    {line}\n" in report
    assert "fused graph: a one-layer toy's training graph with these kernels constructed here" in report
    assert ", ".join(ALL_FUSED_OPS) + "; it cannot execute on this CPU" in report
    assert sum(line.startswith("  step ") for line in result.lines) == 1, report


# ---------------------------------------------------------------------------------------------------------------
# The memory planner


def test_the_planner_drops_the_score_terms_under_flash_attention():
    """Qwen2 tiny (h 64, a 4 heads of d 16, kv 2, I 96), s 256, b 2, bf16 (e 2), no parallelism, no recompute.
    T = 512 tokens. Hand-computed, bytes:
      norm/attention/MLP inputs 4 e T h = 262144; Q, K, V, o_proj input e T (2 a d + 2 kv d) = 196608;
      SwiGLU 4 e T I = 393216;
      core, decomposed: (4 + e) a s^2 b = 3145728 (fp32 softmax + 16-bit probabilities);
      core, flash: the kernel's fp32 softmax max and sum, 2 x 8 x 4 a T = 131072.
      mask per micro-batch: fp32 bias 4 b s^2 = 524288; flash: int64 ends 8 b s = 4096."""
    config = tiny("Qwen2ForCausalLM")
    work = Workload(seq_length=256, micro_batch_size=2, compute_bytes=2)
    flash = dataclasses.replace(work, flash_attention=True)
    parallel = ParallelConfig()
    assert layer_activation_bytes(config, 0, work, parallel, "none") == 262144 + 196608 + 393216 + 3145728
    assert layer_activation_bytes(config, 0, flash, parallel, "none") == 262144 + 196608 + 393216 + 131072
    # selective recompute drops the scores; flash attention has none to drop
    assert layer_activation_bytes(config, 0, work, parallel, "selective") == 262144 + 196608 + 393216
    assert layer_activation_bytes(config, 0, flash, parallel, "selective") == 262144 + 196608 + 393216 + 131072
    assert (attention_mask_bytes(work), attention_mask_bytes(flash)) == (524288, 4096)

"""The parallel plan: the validator accepts exactly the valid (dp, mp, ep, pp) combinations and names the field
and the numbers otherwise; strategies use the whole device mesh; apply_plan sets strategies, pipeline stages and
recompute on a built model. Static: nothing here compiles."""
import itertools
import math
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore.parallel import transform_checkpoints

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict
from mindspore_llm.models.auto import build_model
from mindspore_llm.models.deepseek_v3 import DeepseekV3Config
from mindspore_llm.models.qwen import QwenConfig
from mindspore_llm.models.shapes import parameter_shapes
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.memory import representative_strategies
from mindspore_llm.parallel.plan import REPLICATED, apply_plan, parameter_layout, validate_plan, write_strategy_file
from mindspore_llm.train.config import load_plan_inputs

ROOT = Path(__file__).resolve().parents[1]
QWEN_32B = QwenConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                      num_attention_heads=40, num_key_value_heads=8)
DEEPSEEK_V3 = DeepseekV3Config(vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                               num_attention_heads=128)
SHIPPED = {"qwen2_5_32b_sft_8k_16p.yaml": 16, "qwen2_5_32b_lora_8k_16p.yaml": 16,
           "deepseek_v3_671b_pretrain_4k_2048p.yaml": 2048}
GRID = [1, 2, 3, 4, 5, 8, 16]


def is_valid(dims: dict, dp: int, mp: int, ep: int, pp: int, devices: int) -> bool:
    """The rule written out independently of the validator."""
    return (dp * mp * pp == devices and dp % ep == 0 and dims["layers"] % pp == 0
            and all(size % mp == 0 for size in dims["split_by_mp"])
            and (ep == 1 if dims["experts"] == 0 else dims["experts"] % ep == 0))


def verdict(config, dp, mp, ep, pp, devices) -> bool:
    try:
        parallel = from_dict(ParallelConfig, dict(data_parallel=dp, model_parallel=mp, expert_parallel=ep,
                                                  pipeline_stages=pp, micro_batch_num=max(pp, 1)), "parallel")
        validate_plan(config, parallel, devices)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("name", ["qwen2.5-32b", "deepseek-v3"])
def test_validator_accepts_exactly_the_valid_grid(name):
    if name == "qwen2.5-32b":
        config, devices = QWEN_32B, 16
        dims = {"layers": 64, "experts": 0, "split_by_mp": [40, 8, 27648, 152064]}
    else:  # 61 layers: only pp 1 divides evenly in this grid
        config, devices = DEEPSEEK_V3, 64
        dims = {"layers": 61, "experts": 256, "split_by_mp": [128, 18432, 2048, 129280]}
    accepted, expected = set(), set()
    for dp, mp, ep, pp in itertools.product(GRID, GRID, [1, 2, 4, 8], [1, 2, 4, 8]):
        if verdict(config, dp, mp, ep, pp, devices):
            accepted.add((dp, mp, ep, pp))
        if is_valid(dims, dp, mp, ep, pp, devices):
            expected.add((dp, mp, ep, pp))
    assert accepted == expected
    assert len(accepted) > 3  # the grid exercises both outcomes


def error_of(config, devices, **fields) -> str:
    with pytest.raises(ConfigError) as err:
        parallel = from_dict(ParallelConfig, fields, "parallel")
        validate_plan(config, parallel, devices)
    return str(err.value)


@pytest.mark.parametrize("fields, devices, message", [
    (dict(model_parallel=16), 16, "num_attention_heads (40) is not divisible by model_parallel (16)"),
    (dict(model_parallel=16), 16, "num_key_value_heads (8) is not divisible by model_parallel (16)"),
    (dict(data_parallel=2, model_parallel=8, pipeline_stages=2, micro_batch_num=2), 16,
     "data_parallel (2) x model_parallel (8) x pipeline_stages (2) = 32 devices, but the job has 16"),
    (dict(model_parallel=8, pipeline_stages=2, micro_batch_num=4, stage_layers=[30, 30]), 16,
     "stage_layers [30, 30] sum to 60, the model has num_hidden_layers 64"),
    (dict(model_parallel=4, pipeline_stages=3, micro_batch_num=3), 12,
     "num_hidden_layers (64) is not divisible by pipeline_stages (3); give stage_layers"),
    (dict(model_parallel=8, pipeline_stages=2, micro_batch_num=2, recompute=["full", "none", "none"]), 16,
     "recompute has 3 entries; give one per pipeline stage (2) or one per layer (64)"),
    (dict(data_parallel=2, expert_parallel=2, model_parallel=8), 16, "expert_parallel (2) needs a mixture-of-experts"),
    (dict(data_parallel=2, expert_parallel=4, model_parallel=8), 16,
     "expert_parallel (4) must divide data_parallel (2)"),
    (dict(model_parallel=8, pipeline_stages=2, micro_batch_num=1), 16,
     "micro_batch_num (1) must be >= pipeline_stages (2)"),
])
def test_errors_name_the_field_and_numbers(fields, devices, message):
    assert message in error_of(QWEN_32B, devices, **fields)


def test_batch_sequence_and_expert_errors():
    parallel = ParallelConfig(data_parallel=2, model_parallel=8, micro_batch_num=4, sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"global_batch_size \(64\) != data_parallel \(2\) x micro_batch_size "
                                          r"\(2\) x micro_batch_num \(4\) x gradient_accumulation_steps \(1\) = 16"):
        validate_plan(QWEN_32B, parallel, 16, global_batch_size=64, micro_batch_size=2)
    with pytest.raises(ConfigError, match=r"seq_length \(8190\) is not divisible by model_parallel "
                                          r"\(sequence_parallel\) \(8\)"):
        validate_plan(QWEN_32B, parallel, 16, seq_length=8190)
    validate_plan(QWEN_32B, parallel, 16, global_batch_size=16, micro_batch_size=2, seq_length=8192)
    experts = ParallelConfig(data_parallel=48, expert_parallel=48)
    with pytest.raises(ConfigError, match=r"n_routed_experts \(256\) is not divisible by expert_parallel \(48\)"):
        validate_plan(DEEPSEEK_V3, experts, 48)
    uneven = ParallelConfig(data_parallel=4, pipeline_stages=2, stage_layers=[30, 31], micro_batch_num=2,
                            recompute=["full", "selective"])
    validate_plan(DEEPSEEK_V3, uneven, 8)  # 61 layers split unevenly by an explicit list
    assert uneven.stage_of_layers(61) == [0] * 30 + [1] * 31
    assert uneven.recompute_of_layers(61) == ["full"] * 30 + ["selective"] * 31


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_validate_and_use_the_whole_mesh(name):
    inputs = load_plan_inputs(ROOT / "configs" / name)
    parallel = inputs.parallel
    validate_plan(inputs.model, parallel, SHIPPED[name], inputs.global_batch_size, inputs.micro_batch_size,
                  inputs.gradient_accumulation_steps, inputs.work.seq_length)
    stage_devices = parallel.data_parallel * parallel.model_parallel
    assert stage_devices * parallel.pipeline_stages == SHIPPED[name]
    applied = representative_strategies(inputs.model, parallel, inputs.lora)
    for op in applied:  # every input's device matrix divides the stage's devices (the rest replicate)
        assert all(stage_devices % math.prod(s) == 0 for s in op.strategy), op
    # matmuls: device matrix = the activation's splits x the weight's output split = all devices of a stage
    # (MLA's low-rank down-projections are replicated on purpose: REPLICATED)
    matmuls = [op for op in applied if op.path.endswith(("proj.matmul", "_matmul")) and "lora_" not in op.path
               and op.path.split(".")[-2] not in REPLICATED]
    assert len(matmuls) >= 7
    for op in matmuls:
        x, w = op.strategy
        assert math.prod(x) * w[-2] == stage_devices, op


def test_apply_plan_sets_strategies_stages_and_recompute():
    config = QwenConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2)
    parallel = ParallelConfig(data_parallel=2, model_parallel=2, pipeline_stages=2, micro_batch_num=4,
                              sequence_parallel=True, recompute=["full", "selective", "none", "full"])
    model = build_model(config)
    applied = {op.path: op for op in apply_plan(model, parallel)}
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.matmul.in_strategy == ((2, 1), (2, 1))
    assert applied["model.layers.0.self_attn.o_proj.matmul"].out_strategy == ((4, 1),)  # reduce-scatter (SP)
    assert layer.input_layernorm.square.in_strategy == ((2, 2, 1),)  # sequence-split norm
    assert applied["model.layers.0.self_attn.attention.qk_matmul"].strategy == ((2, 2, 1, 1), (2, 2, 1, 1))
    assert [l.pipeline_stage for l in model.model.layers] == [0, 0, 1, 1]
    assert model.model.embed_tokens.pipeline_stage == 0 and model.lm_head.pipeline_stage == 1
    def recomputed(cell):
        return bool(getattr(cell, "_has_config_recompute", False))

    layers = model.model.layers  # full: the layer and everything in it; selective: the core attention only
    assert [recomputed(l) for l in layers] == [True, False, False, True]
    assert [recomputed(l.mlp) for l in layers] == [True, False, False, True]
    assert [recomputed(l.self_attn.attention) for l in layers] == [True, True, False, True]
    assert "model.layers.0.mlp.gate_proj.bias_add" not in applied  # no bias, no strategy
    assert "model.layers.0.self_attn.q_proj.bias_add" in applied


def test_apply_plan_refuses_stages_that_do_not_cover_the_model():
    config = QwenConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2)
    model = build_model(config)
    with pytest.raises(ConfigError, match=r"stages of \[1, 1\] layers do not cover the model's 3 layers"):
        apply_plan(model, ParallelConfig(pipeline_stages=2, micro_batch_num=2))


def test_expert_parallel_strategies_of_the_stacked_experts():
    config = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                              num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1)
    parallel = ParallelConfig(data_parallel=4, expert_parallel=2, model_parallel=2)
    model = build_model(config)
    apply_plan(model, parallel)
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_matmul.in_strategy == ((2, 2, 1), (2, 2, 1))  # (E, T, H) x (E, I, H): ep, dp/ep, mp
    assert experts.down_matmul.in_strategy == ((2, 2, 2), (2, 1, 2))
    rotary = model.model.layers[0].self_attn.rotary
    assert rotary.mul_cos.in_strategy == ((4, 1, 1, 1), (4, 1, 1, 1))  # MLA's shared rope key has one head


def _slice(array, layout, sizes, coords):
    """The block of `array` a device at mesh coordinates `coords` ({"mp": i, "ep": j}) holds."""
    for axis, name in enumerate(layout):
        if name is not None:
            array = np.split(array, sizes[name], axis=axis)[coords[name]]
    return array


def _save_slices(directory, full, config, parallel):
    """One checkpoint per rank in the layout of `parallel` (ranks: dp outer, ep, mp inner, as the device matrix)."""
    sizes = {"mp": parallel.model_parallel, "ep": parallel.expert_parallel}
    for rank in range(parallel.device_num):
        coords = {"mp": rank % sizes["mp"], "ep": rank // sizes["mp"] % sizes["ep"]}
        params = [{"name": name, "data": ms.Tensor(_slice(full[name], parameter_layout(name, full[name].ndim,
                                                                                         parallel), sizes, coords))}
                  for name in full]
        (directory / f"rank_{rank}").mkdir(parents=True)
        ms.save_checkpoint(params, str(directory / f"rank_{rank}" / "net.ckpt"))


def test_model_parallel_slices_merge_and_reshard_with_mindspore(tmp_path):
    """Slices in the plan's 2-way model-parallel layout -> mindspore.parallel.transform_checkpoints with the
    plan's strategy file -> the full tensors, exactly; and resharded to 4-way, each rank's block."""
    config = QwenConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(0)
    full = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in parameter_shapes(config)}
    two_way = ParallelConfig(model_parallel=2)
    _save_slices(tmp_path / "slices", full, config, two_way)
    rank1 = ms.load_checkpoint(str(tmp_path / "slices" / "rank_1" / "net.ckpt"))  # really halves
    assert rank1["model.layers.0.self_attn.q_proj.weight"].shape == (32, 64)
    assert rank1["model.layers.0.self_attn.o_proj.weight"].shape == (64, 32)
    write_strategy_file(config, two_way, tmp_path / "mp2.ckpt")

    transform_checkpoints(str(tmp_path / "slices"), str(tmp_path / "merged"), "full", str(tmp_path / "mp2.ckpt"))
    merged = ms.load_checkpoint(str(next((tmp_path / "merged").rglob("*.ckpt"))))
    assert set(merged) == set(full)
    for name, array in full.items():
        np.testing.assert_array_equal(merged[name].asnumpy(), array, err_msg=name)

    four_way = ParallelConfig(model_parallel=4)
    write_strategy_file(config, four_way, tmp_path / "mp4.ckpt")
    transform_checkpoints(str(tmp_path / "slices"), str(tmp_path / "mp4"), "net", str(tmp_path / "mp2.ckpt"),
                          str(tmp_path / "mp4.ckpt"))
    rank3 = ms.load_checkpoint(str(next((tmp_path / "mp4" / "rank_3").glob("*.ckpt"))))
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.bias",
                 "lm_head.weight", "model.norm.weight"):
        expected = _slice(full[name], parameter_layout(name, full[name].ndim, four_way), {"mp": 4, "ep": 1},
                          {"mp": 3, "ep": 0})
        np.testing.assert_array_equal(rank3[name].asnumpy(), expected, err_msg=name)


def test_expert_parallel_slices_merge_with_mindspore(tmp_path):
    """DeepSeek-V3 on dp 2 x mp 2 with experts over ep 2: stacked experts split (ep, mp) merge back exactly."""
    config = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                              num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1)
    rng = np.random.default_rng(1)
    full = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in parameter_shapes(config)}
    parallel = ParallelConfig(data_parallel=2, expert_parallel=2, model_parallel=2)
    _save_slices(tmp_path / "slices", full, config, parallel)
    rank3 = ms.load_checkpoint(str(tmp_path / "slices" / "rank_3" / "net.ckpt"))
    assert rank3["model.layers.1.mlp.experts.gate_proj"].shape == (4, 16, 64)  # (E/ep, I/mp, H)
    write_strategy_file(config, parallel, tmp_path / "strategy.ckpt")
    transform_checkpoints(str(tmp_path / "slices"), str(tmp_path / "merged"), "full", str(tmp_path / "strategy.ckpt"))
    merged = ms.load_checkpoint(str(next((tmp_path / "merged").rglob("*.ckpt"))))
    for name, array in full.items():
        np.testing.assert_array_equal(merged[name].asnumpy(), array, err_msg=name)

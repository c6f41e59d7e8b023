"""Per-rank loading and sliced checkpoints, proven by simulating every rank of the shipped plans (MindSpore refuses
SEMI_AUTO_PARALLEL on CPU, so the ranks are computed, not launched).

Plans: configs/qwen2_5_32b_sft_8k_16p.yaml (tp 8 x pp 2, the DeepSeek-R1-Distill-Qwen-32B job) on a scaled-down
Qwen2 with its features (q/k/v biases, GQA, untied head) in bf16 as the R1-Distill release; and
configs/deepseek_v3_671b_pretrain_4k_2048p.yaml (dp 128 x pp 16 with ep 64, 2048 ranks, uneven stages) on a
scaled-down 61-layer DeepSeek-V3 stored as the release is: FP8 linear weights with 128x128 block scales,
per-expert tensors, an MTP layer.

References, all bit-exact: the full tensors of the source (bf16 bits widened; FP8 dequantized by
``checkpoint.dequantize_fp8``, itself bit-exact against DeepSeek's ``weight_dequant`` in tests/test_ckpt_fp8.py);
MindSpore's own ``transform_checkpoint_by_rank`` cutting the full checkpoint by the same (merged) strategy file.
"""
import dataclasses
import json

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore.parallel import transform_checkpoint_by_rank
from safetensors.torch import save_file as save_torch_file

from mindspore_llm.checkpoint import (WeightReader, bf16_bits_to_float32, block_shape, check_tensor_names,
                                      dequantize_fp8, float32_to_bf16_bits, load_weights, rank_weights)
from mindspore_llm.common import CheckpointError
from mindspore_llm.checkpoint_slices import differing_layouts, read_strategy, write_strategy_files
from mindspore_llm.models.auto import AutoModelForCausalLM, build_model
from mindspore_llm.models.deepseek_v3 import DeepseekV3Config
from mindspore_llm.models.qwen import QwenConfig
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.plan import parameter_layouts, validate_plan, write_strategy_file
from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import load_plan_inputs
from tests.ckpt_helpers import raw_tensors, run
from tests.test_trainer import REPO

QWEN_32B_PLAN = REPO / "configs" / "qwen2_5_32b_sft_8k_16p.yaml"
DEEPSEEK_V3_PLAN = REPO / "configs" / "deepseek_v3_671b_pretrain_4k_2048p.yaml"
QWEN = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8, qkv_bias=True, tie_word_embeddings=False, max_position_embeddings=64)
DEEPSEEK = DeepseekV3Config(vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=16,
                            num_hidden_layers=61, num_attention_heads=8, q_lora_rank=64, kv_lora_rank=32,
                            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=64,
                            num_experts_per_tok=2, n_group=8, topk_group=4, first_k_dense_replace=3,
                            n_shared_experts=1, max_position_embeddings=64, tie_word_embeddings=False)


def quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (rows, columns) -> (e4m3fn bits, 128x128 block scales amax / 448), DeepSeek's FP8 format; the blocks
    of tests/test_ckpt_fp8.py's `quantize`, vectorised."""
    rows, columns = weight.shape
    blocks = (-(-rows // 128), -(-columns // 128))
    padded = np.zeros((blocks[0] * 128, blocks[1] * 128), np.float32)
    padded[:rows, :columns] = np.abs(weight)
    scale = padded.reshape(blocks[0], 128, blocks[1], 128).max(axis=(1, 3)) / 448.0
    expanded = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:rows, :columns]
    bits = torch.from_numpy(weight / expanded).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return bits, scale.astype(np.float32)


def shipped_parallel(plan, model_config):
    parallel = load_plan_inputs(plan).parallel
    validate_plan(model_config, parallel, parallel.device_num)
    return parallel


def lazy_model(model_config):
    model = build_model(model_config, materialize=False)
    shapes = {p.name: tuple(p.shape) for p in model.get_parameters()}
    return model, shapes


@pytest.fixture(scope="module")
def qwen(module_dir):
    """The 32B family at toy size, saved in bf16 with a Hugging Face config.json."""
    model, shapes = lazy_model(QWEN)
    rng = np.random.default_rng(0)
    bits = {name: float32_to_bf16_bits(rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}
    source = module_dir / "qwen_bf16"
    source.mkdir()
    save_torch_file({n: torch.from_numpy(b.view(np.int16)).view(torch.bfloat16) for n, b in bits.items()},
                    str(source / "model.safetensors"), metadata={"format": "pt"})
    (source / "config.json").write_text(json.dumps(QWEN.to_hf()))
    full = {name: bf16_bits_to_float32(b) for name, b in bits.items()}
    return model, shapes, source, full


@pytest.fixture(scope="module")
def deepseek(module_dir):
    """DeepSeek-V3 at toy size, stored as the release: FP8 + weight_scale_inv for the projections (experts
    included, one tensor per expert), bf16 elsewhere, and an MTP layer (model.layers.61.*) the loader skips."""
    model, shapes = lazy_model(DEEPSEEK)
    rng = np.random.default_rng(1)
    stored, full = {}, {}
    for name, shape in shapes.items():
        if name.endswith(model.STATISTICS_SUFFIXES):
            continue
        names = model.checkpoint_sources(name)
        for source in names:
            weight = (rng.standard_normal(shape[1:] if len(names) > 1 else shape) * 0.3).astype(np.float32)
            if weight.ndim == 2 and "proj" in source:
                bits, scale = quantize(weight)
                stored[source] = torch.from_numpy(bits).view(torch.float8_e4m3fn)
                stored[source + "_scale_inv"] = torch.from_numpy(scale)
                full[source] = dequantize_fp8(bits, scale)
            else:
                stored[source] = torch.from_numpy(weight).to(torch.bfloat16)
                full[source] = stored[source].float().numpy()
    stored["model.layers.61.eh_proj.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)  # MTP: skipped
    source = module_dir / "deepseek_fp8"
    source.mkdir()
    save_torch_file(stored, str(source / "model.safetensors"), metadata={"format": "pt"})
    hf = DEEPSEEK.to_hf()
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (source / "config.json").write_text(json.dumps(hf))
    # our parameters' full values: per-expert tensors stacked
    params = {name: np.stack([full[s] for s in model.checkpoint_sources(name)])
              if len(model.checkpoint_sources(name)) > 1 else full[name]
              for name in shapes if not name.endswith(model.STATISTICS_SUFFIXES)}
    return model, shapes, source, params


def simulate_every_rank(model, shapes, source, layouts, world_size):
    """Each rank's blocks as the loader reads them (the checkpoint opened once), joined: name -> (full array,
    elements covered)."""
    reader = WeightReader(source)
    check_tensor_names(model, reader, shapes)
    joined = {name: np.full(shape, np.nan, np.float32) for name, shape in shapes.items()}
    held = {name: 0 for name in shapes}
    for rank in range(world_size):
        for name, block, values in rank_weights(model, reader, layouts, rank, shapes, check_names=False):
            assert values.shape == block_shape(block) and values.dtype == np.float32, name
            target = joined[name][block]
            if np.isnan(target).any():  # the first rank holding this block
                joined[name][block] = values
                held[name] += values.size
            else:  # a replica (data parallel): the same bits
                np.testing.assert_array_equal(values, target, err_msg=f"{name} on rank {rank}")
    return joined, held


def mindspore_slices(tmp, full: dict, strategy, ranks):
    """rank -> {name: array} as MindSpore's transform_checkpoint_by_rank cuts the full checkpoint."""
    (tmp / "full").mkdir()
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in full.items()], str(tmp / "full" / "f.ckpt"))
    out = {}
    for rank in ranks:
        target = tmp / f"rank_{rank}.ckpt"
        transform_checkpoint_by_rank(rank, {0: str(tmp / "full" / "f.ckpt")}, str(target), None, str(strategy))
        out[rank] = {name: value.asnumpy() for name, value in ms.load_checkpoint(str(target)).items()}
    return out


# -- the 32B plan: tp 8 x pp 2 ----------------------------------------------------------------------------------

def test_every_rank_of_the_32b_plan_reads_slices_that_rejoin_the_source(qwen, tmp_path):
    model, shapes, source, full = qwen
    parallel = shipped_parallel(QWEN_32B_PLAN, QWEN)
    assert (parallel.model_parallel, parallel.pipeline_stages, parallel.device_num) == (8, 2, 16)
    write_strategy_file(QWEN, parallel, tmp_path / "strategy.ckpt")  # per stage, merged by MindSpore
    layouts = read_strategy(tmp_path / "strategy.ckpt")
    planned = parameter_layouts(shapes.items(), parallel, QWEN.num_hidden_layers, QWEN.tie_word_embeddings)
    for rank in range(16):
        assert differing_layouts(layouts, planned, shapes, rank) == []
    joined, held = simulate_every_rank(model, shapes, source, layouts, 16)
    for name, array in full.items():
        assert held[name] == array.size, name  # every element read exactly once across distinct blocks
        np.testing.assert_array_equal(joined[name], array, err_msg=name)
    # a rank holds its stage's parameters only: rank 3 (stage 0) no final norm, rank 12 (stage 1) no embedding
    names = {r: {n for n, _, _ in rank_weights(model, source, layouts, r, shapes)} for r in (3, 12)}
    assert "model.norm.weight" in names[12] - names[3] and "model.embed_tokens.weight" in names[3] - names[12]
    q = "model.layers.0.self_attn.q_proj.weight"  # (64, 64) column-parallel: rank 3 holds rows 24..31
    assert dict((n, b) for n, b, _ in rank_weights(model, source, layouts, 3, shapes))[q] == (slice(24, 32),
                                                                                            slice(0, 64))


def test_mindspore_cuts_the_same_32b_slices_from_the_same_strategy(qwen, tmp_path):
    model, shapes, source, full = qwen
    parallel = shipped_parallel(QWEN_32B_PLAN, QWEN)
    write_strategy_file(QWEN, parallel, tmp_path / "strategy.ckpt")
    layouts = read_strategy(tmp_path / "strategy.ckpt")
    theirs = mindspore_slices(tmp_path, full, tmp_path / "strategy.ckpt", range(16))
    for rank in range(16):
        ours = {name: values for name, _, values in rank_weights(model, source, layouts, rank, shapes)}
        assert set(ours) == set(theirs[rank]), rank
        for name, values in ours.items():
            np.testing.assert_array_equal(values, theirs[rank][name], err_msg=f"{name} on rank {rank}")


@pytest.mark.parametrize("group", [2, 4])
def test_optimizer_sharded_slices_agree_with_mindspore(qwen, tmp_path, group):
    """The parallel optimizer splits a weight's first dimension again over `group` of its replicas (dp 4 x mp 2):
    the blocks MindSpore's transform cuts by a strategy with opt_weight_shard_size."""
    model, shapes, source, full = qwen
    parallel = ParallelConfig(data_parallel=4, model_parallel=2)
    planned = parameter_layouts(shapes.items(), parallel, QWEN.num_hidden_layers, QWEN.tie_word_embeddings)
    layouts = {name: dataclasses.replace(layout, opt_shard_size=group) if len(shapes[name]) == 2 else layout
               for name, layout in planned.items()}
    (file,) = write_strategy_files(layouts, tmp_path)
    assert read_strategy(file) == layouts
    theirs = mindspore_slices(tmp_path, full, file, range(8))
    for rank in range(8):
        ours = {name: values for name, _, values in rank_weights(model, source, layouts, rank, shapes)}
        for name, values in ours.items():
            np.testing.assert_array_equal(values, theirs[rank][name], err_msg=f"{name} on rank {rank}")
    # q_proj (64, 64): rows by mp 2, then by the group; rank 5 = grid (dp 2, mp 1): piece 2 % group of rows 32..63
    rows = {2: slice(32, 48), 4: slice(48, 56)}[group]
    assert layouts["model.layers.0.self_attn.q_proj.weight"].block((64, 64), 5) == (rows, slice(0, 64))


def test_a_rank_loads_its_slices_into_the_model(qwen, tmp_path):
    """load_weights with the layouts: sliced parameters of this rank's stage, the other stage's unallocated."""
    _, shapes, source, full = qwen
    parallel = shipped_parallel(QWEN_32B_PLAN, QWEN)
    layouts = parameter_layouts(shapes.items(), parallel, QWEN.num_hidden_layers, QWEN.tie_word_embeddings)
    model = build_model(QWEN, materialize=False)
    load_weights(model, source, layouts, rank=13, shapes=shapes)
    params = model.parameters_dict()
    down = params["model.layers.3.mlp.down_proj.weight"]  # row-parallel (64, 128): rank 13 = tp index 5
    assert down.sliced and tuple(down.shape) == (64, 16)
    np.testing.assert_array_equal(down.asnumpy(), full["model.layers.3.mlp.down_proj.weight"][:, 80:96])
    assert params["model.layers.0.mlp.down_proj.weight"].has_init  # stage 0's: never allocated on rank 13


def test_shard_then_merge_slices_round_trips_bit_identically(qwen, tmp_path):
    _, shapes, source, _ = qwen
    plan = tmp_path / "train.yaml"
    plan.write_text(_with_model_path(QWEN_32B_PLAN, source))
    result = run("shard", source, tmp_path / "sliced", "--config", plan, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "sliced").glob("rank_*")) == sorted(f"rank_{r}" for r in range(16))
    result = run("merge-slices", tmp_path / "sliced", tmp_path / "merged", "--quiet")
    assert result.exit_code == 0, result.output
    assert raw_tensors(tmp_path / "merged") == raw_tensors(source)  # names, dtypes (bf16 kept), bits
    assert run("verify", source, tmp_path / "merged").exit_code == 0
    # the trainer's path: each rank reads its own directory of the sliced copy, the same values
    layouts = read_strategy(tmp_path / "sliced" / "strategy.ckpt")
    model = build_model(QWEN, materialize=False)
    direct = {n: v for n, _, v in rank_weights(model, source, layouts, 9, shapes)}
    presliced = {n: v for n, _, v in rank_weights(model, tmp_path / "sliced", layouts, 9, shapes)}
    assert set(direct) == set(presliced)
    for name in direct:
        np.testing.assert_array_equal(presliced[name], direct[name], err_msg=name)


def _with_model_path(plan, source) -> str:
    """The shipped YAML with its model section replaced by `path: source`."""
    import yaml

    raw = yaml.safe_load(plan.read_text())
    raw["model"] = {"path": str(source)}
    return yaml.safe_dump(raw)


def test_presliced_directory_for_another_plan_is_refused(qwen, tmp_path):
    _, shapes, source, _ = qwen
    (tmp_path / "train.yaml").write_text(_with_model_path(QWEN_32B_PLAN, source))
    assert run("shard", source, tmp_path / "sliced", "--config", tmp_path / "train.yaml", "--quiet").exit_code == 0
    parallel = dataclasses.replace(shipped_parallel(QWEN_32B_PLAN, QWEN), model_parallel=4, data_parallel=2)
    other = parameter_layouts(shapes.items(), parallel, QWEN.num_hidden_layers, QWEN.tie_word_embeddings)
    model = build_model(QWEN, materialize=False)
    with pytest.raises(CheckpointError, match="shard the model again for this job"):
        list(rank_weights(model, tmp_path / "sliced", other, 1, shapes))


# -- the DeepSeek-V3 plan: 2048 ranks ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deepseek_strategy(module_dir):
    """The shipped plan's strategy for the toy model (16 stage files merged by MindSpore) and its layouts."""
    parallel = shipped_parallel(DEEPSEEK_V3_PLAN, DEEPSEEK)
    assert parallel.device_num == 2048 and parallel.expert_parallel == 64
    write_strategy_file(DEEPSEEK, parallel, module_dir / "deepseek_strategy.ckpt")
    return parallel, module_dir / "deepseek_strategy.ckpt", read_strategy(module_dir / "deepseek_strategy.ckpt")


def test_every_rank_of_the_deepseek_v3_plan_reads_fp8_slices_that_rejoin_the_source(deepseek, deepseek_strategy):
    model, shapes, source, full = deepseek
    parallel, _, layouts = deepseek_strategy
    weights = {n: s for n, s in shapes.items() if n in full}
    planned = parameter_layouts(weights.items(), parallel, DEEPSEEK.num_hidden_layers, False)
    for rank in (0, 700, 2047):
        assert differing_layouts(layouts, planned, weights, rank) == []
    joined, held = simulate_every_rank(model, weights, source, layouts, 2048)
    for name, array in full.items():
        assert held[name] == array.size, name
        np.testing.assert_array_equal(joined[name], array, err_msg=name)
    # rank 2047 (stage 15, ep 63 of 64, tp 1) holds expert 63 of its stage's MoE layers, whole
    blocks = {n: b for n, b, _ in rank_weights(model, source, layouts, 2047, weights)}
    assert blocks["model.layers.60.mlp.experts.gate_proj"] == (slice(63, 64), slice(0, 16), slice(0, 256))
    assert "model.layers.58.mlp.experts.gate_proj" not in blocks  # stage 14's


def test_mindspore_cuts_the_same_deepseek_v3_slices(deepseek, deepseek_strategy, tmp_path):
    """Two ranks whose (stage, dp, ep) coordinates are all non-zero, one of them the last of every axis."""
    model, shapes, source, full = deepseek
    _, strategy, layouts = deepseek_strategy
    weights = {n: s for n, s in shapes.items() if n in full}
    ranks = [1 * 128 + 64 + 5, 2047]
    theirs = mindspore_slices(tmp_path, full, strategy, ranks)
    for rank in ranks:
        ours = {name: values for name, _, values in rank_weights(model, source, layouts, rank, weights)}
        assert set(ours) == set(theirs[rank]), rank
        for name, values in ours.items():
            np.testing.assert_array_equal(values, theirs[rank][name], err_msg=f"{name} on rank {rank}")


# -- the trainer's final export of a sliced run --------------------------------------------------------------------

def save_rank_slices(directory, arrays, layouts, world_size):
    """rank_N/train_state.ckpt as every rank of a semi-auto run saves its slices (with an optimizer entry)."""
    for rank in range(world_size):
        params = [{"name": name, "data": ms.Tensor(array[layouts[name].block(array.shape, rank)])}
                  for name, array in arrays.items() if layouts[name].on_rank(rank)]
        params.append({"name": "optimizer.step", "data": ms.Tensor(np.array(3, np.int32))})
        (directory / f"rank_{rank}").mkdir(parents=True)
        ms.save_checkpoint(params, str(directory / f"rank_{rank}" / checkpointing.TRAIN_STATE))


def test_final_export_of_a_sliced_run_joins_every_rank(qwen, tmp_path):
    """tp 8 x pp 2: the final model directory holds the full tensors, never one rank's slice; a LoRA run's adapters
    are joined across the tensor-parallel slices (B split with its column-parallel base, A with a row-parallel)."""
    from mindspore_llm.lora import LoraConfig, apply_lora

    model, shapes, _, full = qwen
    parallel = shipped_parallel(QWEN_32B_PLAN, QWEN)
    layouts = parameter_layouts(shapes.items(), parallel, QWEN.num_hidden_layers, QWEN.tie_word_embeddings)
    save_rank_slices(tmp_path / "step", full, layouts, 16)
    (tmp_path / "strategy").mkdir()
    write_strategy_files(layouts, tmp_path / "strategy")
    checkpointing.export_from_slices(tmp_path / "step", tmp_path / "strategy", model, QWEN, shapes, tmp_path / "final")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for name, array in full.items():
        np.testing.assert_array_equal(exported.parameters_dict()[name].asnumpy(), array, err_msg=name)

    lora_model = build_model(QWEN, materialize=False)
    apply_lora(lora_model, LoraConfig(rank=4, target_modules=["q_proj", "o_proj"]))
    rng = np.random.default_rng(2)
    adapters = {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in lora_model.trainable_params()}
    adapter_layouts = parameter_layouts(((n, a.shape) for n, a in adapters.items()), parallel,
                                        QWEN.num_hidden_layers, False)
    assert adapter_layouts["model.layers.0.self_attn.q_proj.lora_B.weight"].tensor_map == (0, -1)
    assert adapter_layouts["model.layers.0.self_attn.o_proj.lora_A.weight"].tensor_map == (-1, 0)
    save_rank_slices(tmp_path / "lora_step", adapters, adapter_layouts, 16)
    (tmp_path / "lora_strategy").mkdir()
    write_strategy_files(adapter_layouts, tmp_path / "lora_strategy")
    joined = checkpointing.adapters_from_slices(tmp_path / "lora_step", tmp_path / "lora_strategy",
                                                {n: a.shape for n, a in adapters.items()})
    for name, array in adapters.items():
        np.testing.assert_array_equal(joined[name], array, err_msg=name)

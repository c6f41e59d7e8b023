"""QLoRA against bitsandbytes (the reference), transformers' BitsAndBytesConfig models and peft, on the CPU.

bitsandbytes' Linear4bit takes a bf16 fast path on CPUs with AVX512-BF16 (about 3e-3 off exact NF4): it is switched
off, so that it dequantizes and runs an fp32 matmul, which is what is compared. Its CPU matmul needs output
features divisible by 64, hence the tiny models' dimensions. Tolerances: bit for bit where the arithmetic is the
same; logits max|Δ| <= 1e-4 x max|reference logit| (measured 4e-7 to 1.7e-6 relative).
"""
import json
import math

import bitsandbytes.functional as bnb
import mindspore as ms
import numpy as np
import peft
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner

from ckpt_tools import cli as ckpt_cli
from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.checkpoint import CkptFile
from mindspore_llm.cli import main as msllm
from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict
from mindspore_llm.generation import GenerationConfig, Generator
from mindspore_llm.lora import LoraConfig, apply_lora, lora_layers
from mindspore_llm.models.auto import build_model
from mindspore_llm.models.config import config_from_hf, load_config
from mindspore_llm.models.kernels import Kernels
from mindspore_llm.models.quantized import (Int8Weight, NF4Weight, model_quantization, quantize_model,
                                            quantized_weight_shapes)
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.memory import Workload, _representative_model, estimate_memory
from mindspore_llm.parallel.plan import apply_plan, parameter_layout, validate_plan
from mindspore_llm.peft import load_peft_adapter, write_adapter
from mindspore_llm.quant import DYNAMIC_MAP, NF4_CODE, QuantizationConfig, _quantize_dynamic, quantize
from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import train_config_from_dict
from mindspore_llm.train.trainer import Trainer
from tests import reference
from tests.test_lora import assert_close, logits_of, torch_logits
from tests.test_trainer import ASSETS, REPO

NF4 = QuantizationConfig(method="nf4")
NF4_DQ = QuantizationConfig(method="nf4", double_quant=True)
INT8 = QuantizationConfig(method="int8")
# output features all multiples of 64 (bitsandbytes' CPU matmul), in_features too (our blocks never straddle rows);
# one decoder layer: every quantized projection kind is in it, and each compiled graph costs half
QWEN2 = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
QWEN3 = dict(hidden_size=64, head_dim=32, intermediate_size=128, num_hidden_layers=1)


def bnb_model(directory, config: QuantizationConfig | None = None):
    """transformers' model of `directory` through bitsandbytes (pre-quantized if the directory says so)."""
    quantization = {} if config is None else {"quantization_config": transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=config.double_quant)}
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="eager", **quantization)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # exact NF4 (see the module docstring)
    return model.eval()


def on_grid(directory, torch_model):
    """Round every linear weight to a multiple of 2^-12 and save again: the block absmax values then sum exactly
    in float32, so bitsandbytes' double-quantization offset (torch's float32 mean, whose rounding depends on the
    CPU's vector width) equals ours exactly on any machine."""
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.Linear) and module is not torch_model.lm_head:
                module.weight.copy_(torch.round(module.weight * 4096) / 4096)
    torch_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def qwen2_dir(module_dir):
    return on_grid(module_dir / "qwen2", reference.qwen2(module_dir / "qwen2", **QWEN2))


@pytest.fixture(scope="module")
def batch():
    return reference.random_batch(128, 2, 10, seed=1, left_pad=(0, 3))


# -- the numbers: quantize and dequantize as bitsandbytes ---------------------------------------------------------

def test_code_tables_are_bitsandbytes():
    np.testing.assert_array_equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(DYNAMIC_MAP, bnb.create_dynamic_map().numpy())


def grid_weight(rng, shape):
    """Weights on a 2^-10 grid, so that the block absmax values sum exactly in float32 whatever the order: torch's
    float32 mean (bitsandbytes' double-quantization offset) then equals the exactly rounded one used here. One block
    is all zero and one holds every NF4 midpoint exactly (ties take the lower code)."""
    weight = (rng.integers(-1024, 1025, shape) / 1024).astype(np.float32)
    weight[0, :64] = 0
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    weight[1, :64] = np.resize(np.concatenate([midpoints, [1.0]]), 64)
    return weight


def dequantized(cell_type, arrays, shape, **kwargs):
    """The in-graph dequantization (what a quantized linear layer multiplies by) of `arrays`."""
    cell = cell_type(*shape, dtype=ms.float32, **kwargs)
    for name, value in arrays.items():
        getattr(cell, name).set_data(ms.Tensor(np.ascontiguousarray(value)))
    return cell().asnumpy()


@pytest.mark.parametrize("config", [NF4, NF4_DQ], ids=["nf4", "nf4-double-quant"])
def test_nf4_quantize_and_dequantize_equal_bitsandbytes_bit_for_bit(config):
    weight = grid_weight(np.random.default_rng(0), (256, 512))
    ours = quantize(weight, config)
    codes, state = bnb.quantize_4bit(torch.from_numpy(weight), blocksize=64, quant_type="nf4",
                                     compress_statistics=config.double_quant)
    np.testing.assert_array_equal(ours["codes"].reshape(-1), codes.numpy().reshape(-1))
    np.testing.assert_array_equal(ours["absmax"].reshape(-1), state.absmax.numpy())
    if config.double_quant:
        np.testing.assert_array_equal(ours["nested_absmax"], state.state2.absmax.numpy())
        assert ours["nested_offset"] == np.float32(state.offset.item())
    reference_weight = bnb.dequantize_4bit(codes, state).numpy()
    np.testing.assert_array_equal(dequantized(NF4Weight, ours, weight.shape, double_quant=config.double_quant),
                                  reference_weight)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])
def test_any_bitsandbytes_state_dequantizes_bit_for_bit(double_quant):
    """Arbitrary weights (200 rows: a short last nested block), quantized by bitsandbytes."""
    weight = (np.random.default_rng(1).standard_normal((200, 320)) * 0.02).astype(np.float32)
    codes, state = bnb.quantize_4bit(torch.from_numpy(weight), blocksize=64, quant_type="nf4",
                                     compress_statistics=double_quant)
    arrays = {"codes": codes.numpy().reshape(200, 160), "absmax": state.absmax.numpy().reshape(200, 5)}
    if double_quant:
        arrays.update(nested_absmax=state.state2.absmax.numpy(), nested_offset=np.array(state.offset.item(),
                                                                                         np.float32))
    np.testing.assert_array_equal(dequantized(NF4Weight, arrays, weight.shape, double_quant=double_quant),
                                  bnb.dequantize_4bit(codes, state).numpy())
    np.testing.assert_array_equal(quantize(weight, NF4)["codes"].reshape(-1), codes.numpy().reshape(-1))


def test_double_quantization_codes_equal_bitsandbytes_on_any_values():
    """bitsandbytes' CPU quantize_blockwise (its 65536-point lookup, a shorter last block, a zero block)."""
    values = np.random.default_rng(2).standard_normal(256 * 40 + 100).astype(np.float32)
    values *= (10.0 ** np.random.default_rng(3).uniform(-4, 0, values.size)).astype(np.float32)
    values[256:512] = 0
    codes, absmax = _quantize_dynamic(values, 256)
    reference_codes, state = bnb.quantize_blockwise(torch.from_numpy(values), blocksize=256)
    np.testing.assert_array_equal(codes, reference_codes.numpy())
    np.testing.assert_array_equal(absmax, state.absmax.numpy())


def test_int8_quantize_and_dequantize_equal_bitsandbytes_bit_for_bit():
    weight = (np.random.default_rng(4).standard_normal((96, 128)) * 0.05).astype(np.float32)
    weight[3] = 0
    ours = quantize(weight, INT8)
    codes, stats, _ = bnb.int8_vectorwise_quant(torch.from_numpy(weight))
    np.testing.assert_array_equal(ours["codes"], codes.numpy())
    np.testing.assert_array_equal(ours["absmax"], stats.numpy())
    np.testing.assert_array_equal(dequantized(Int8Weight, ours, weight.shape),
                                  bnb.int8_vectorwise_dequant(codes, stats).numpy())


# -- models: transformers + bitsandbytes, peft, generation ---------------------------------------------------------

MODEL_CASES = {"qwen2-nf4-double-quant": ("qwen2", NF4_DQ), "qwen3-nf4": ("qwen3", NF4)}


@pytest.fixture(scope="module")
def loaded(module_dir, qwen2_dir):
    """case -> (its model directory, our model loaded quantized), each built and compiled once."""
    directories = {"qwen2": qwen2_dir}
    models = {}

    def get(case):
        family, config = MODEL_CASES[case]
        if family not in directories:
            directories[family] = on_grid(module_dir / family, reference.qwen3(module_dir / family, **QWEN3))
        if case not in models:
            models[case] = AutoModelForCausalLM.from_pretrained(directories[family], quantization=config)
        return directories[family], models[case]
    return get


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_logits_equal_transformers_with_bitsandbytes(case, loaded, batch):
    directory, model = loaded(case)
    config = MODEL_CASES[case][1]
    assert model_quantization(model) == config
    assert_close(logits_of(model, batch), torch_logits(bnb_model(directory, config), batch), batch)


def test_greedy_generation_on_the_quantized_model_matches_bitsandbytes(loaded):
    directory, model = loaded("qwen2-nf4-double-quant")
    prompt = [5, 17, 99, 3]
    ours = Generator(model, GenerationConfig(max_new_tokens=6), 1, len(prompt)).generate([prompt]).completions()[0]
    reference_model, ids = bnb_model(directory, NF4_DQ), list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(reference_model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ours == ids[len(prompt):]


def test_peft_adapter_on_the_quantized_model_equals_peft_on_bitsandbytes(loaded, module_dir, batch):
    directory, _ = loaded("qwen2-nf4-double-quant")
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(bnb_model(directory, NF4_DQ), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM")).eval()
    peft_model.save_pretrained(module_dir / "qlora_peft")
    model = AutoModelForCausalLM.from_pretrained(directory, quantization=NF4_DQ)
    load_peft_adapter(model, module_dir / "qlora_peft")
    assert len(lora_layers(model)) == 4
    assert_close(logits_of(model, batch), torch_logits(peft_model, batch), batch)


def base_params(model) -> dict[str, np.ndarray]:
    """Every parameter but LoRA adapters."""
    return {p.name: p.asnumpy() for p in model.get_parameters() if ".lora_" not in p.name}


def assert_same_base(model, reference_model):
    ours, expected = base_params(model), base_params(reference_model)
    assert sorted(ours) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_quantizing_in_memory_equals_quantizing_while_streaming(loaded):
    """apply_lora with quantize_base on a model loaded in float holds what loading it quantized holds."""
    directory, streamed = loaded("qwen2-nf4-double-quant")
    in_memory = AutoModelForCausalLM.from_pretrained(directory)
    apply_lora(in_memory, LoraConfig(rank=4, target_modules=["q_proj"], quantize_base="nf4", double_quant=True))
    assert_same_base(in_memory, streamed)
    with pytest.raises(ConfigError, match="lora.quantize_base"):
        apply_lora(in_memory, LoraConfig(target_modules=["v_proj"], quantize_base="int8"))


# -- checkpoints: pre-quantized directories, both ways ------------------------------------------------------------

@pytest.fixture(scope="module")
def prequantized(loaded, module_dir):
    directory, model = loaded("qwen2-nf4-double-quant")
    result = CliRunner().invoke(ckpt_cli.main, ["quantize", str(directory), str(module_dir / "nf4"),
                                                "--double-quant", "--quiet"])
    assert result.exit_code == 0, result.output
    return directory, model, module_dir / "nf4"


def test_prequantized_directory_loads_without_the_original(prequantized):
    directory, streamed, quantized_dir = prequantized
    stored = json.loads((quantized_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.down_proj.weight.nested_absmax" in stored
    assert_same_base(AutoModelForCausalLM.from_pretrained(quantized_dir), streamed)  # as saved, no argument
    with pytest.raises(ConfigError, match="saved quantized as"):
        AutoModelForCausalLM.from_pretrained(quantized_dir, quantization="int8")


def test_prequantized_directories_are_interchangeable_with_transformers(prequantized, module_dir, batch):
    """transformers loads ours (bitsandbytes' layout and quantization_config), and we load what it saves: the
    codes and scales bitsandbytes computed, which on these weights are exactly ours."""
    directory, streamed, quantized_dir = prequantized
    assert_close(logits_of(streamed, batch), torch_logits(bnb_model(quantized_dir), batch), batch)
    saved = module_dir / "saved_by_transformers"
    bnb_model(directory, NF4_DQ).save_pretrained(saved)
    assert_same_base(AutoModelForCausalLM.from_pretrained(saved), streamed)


def test_checkpoint_tools_refuse_a_quantized_base_clearly(prequantized, tmp_path):
    _, _, quantized_dir = prequantized
    adapter = write_adapter(tmp_path / "adapter", LoraConfig(rank=1, target_modules=["q_proj"]),
                            {"model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((1, 128), np.float32),
                             "model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((128, 1), np.float32)},
                            {"model.layers.0.self_attn.q_proj"})
    result = CliRunner().invoke(ckpt_cli.main, ["merge-lora", str(quantized_dir), str(adapter), str(tmp_path / "m")])
    assert result.exit_code == 2 and "saved quantized" in result.output and "original-precision" in result.output
    assert not (tmp_path / "m").exists()


# -- training ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qlora_run(module_dir):
    """6 steps of the trainer on 4 of the shipped SFT conversations (the same packed rows every step): a vocab-512
    Qwen2 read from its directory, its base quantized while streaming in (nf4, double quantization), LoRA on
    every projection."""
    base = on_grid(module_dir / "qlora_base", reference.qwen2(module_dir / "qlora_base", vocab_size=512, **QWEN2))
    data = module_dir / "sft4.jsonl"
    data.write_text("".join((ASSETS / "sft.jsonl").read_text().splitlines(keepends=True)[:4]))
    raw = {"model": {"path": str(base)},
           "data": dict(kind="sft", path=str(data), tokenizer=str(ASSETS), seq_length=64, packing=True),
           "schedule": dict(lr=1e-2, warmup_steps=1, decay="constant"),
           "train": dict(micro_batch_size=4, steps=6, seed=3),
           "lora": dict(rank=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"],
                        quantize_base="nf4", double_quant=True),
           "logging": dict(progress_bar=False, tensorboard=False, plot=False),
           "output_dir": str(module_dir / "qlora_run")}
    trainer = Trainer(train_config_from_dict(raw, "qlora.yaml"))
    assert len(trainer.dataset) <= 4  # at most one micro-batch: every step trains on the same rows
    frozen = base_params(trainer.model)
    return base, trainer, frozen, trainer.run()


def test_qlora_run_lowers_the_loss_and_leaves_the_quantized_base_bitwise(qlora_run):
    _, trainer, frozen, result = qlora_run
    print("losses", [round(loss, 4) for _, loss in result.losses])
    assert result.last_loss < result.first_loss - 0.3  # measured 6.23 -> 5.60
    held = base_params(trainer.model)
    assert held["model.layers.0.mlp.down_proj.weight.codes"].dtype == np.uint8
    for name, value in frozen.items():
        np.testing.assert_array_equal(held[name], value, err_msg=name)


def test_qlora_checkpoint_holds_no_base_and_resume_quantizes_it_again(qlora_run):
    """The run's training checkpoint holds the adapters, their optimizer state and the loss scale, not the uint8
    codes (a LoRA run on model.path reads its base from there at every start, docs/checkpoints.md); a resumed run
    quantizes the base again, bit for bit, and continues from the trained adapters."""
    _, trainer, _, result = qlora_run
    stored = CkptFile(result.checkpoint / "rank_0" / checkpointing.TRAIN_STATE).names()
    assert not [n for n in stored if ".weight." in n and ".lora_" not in n], stored
    resumed = Trainer(trainer.config, resume=True)
    assert resumed.start_step == 6
    for name, value in base_params(trainer.model).items():
        np.testing.assert_array_equal(resumed.model.parameters_dict()[name].asnumpy(), value, err_msg=name)
    for param in trainer.model.trainable_params():
        np.testing.assert_array_equal(resumed.model.parameters_dict()[param.name].asnumpy(), param.asnumpy(),
                                      err_msg=param.name)


def test_qlora_adapter_loads_in_peft_on_the_bitsandbytes_base(qlora_run):
    """peft puts the exported adapter, unchanged, on transformers' NF4 model of the base (that the two then compute
    the same logits is test_peft_adapter_on_the_quantized_model_equals_peft_on_bitsandbytes)."""
    base, trainer, _, result = qlora_run
    assert result.adapter
    peft_model = peft.PeftModel.from_pretrained(bnb_model(base, NF4_DQ), result.final_model_dir)
    loaded_adapters = {name.replace("base_model.model.", "").replace(".default", ""): value.detach().numpy()
                       for name, value in peft_model.named_parameters() if ".lora_" in name}
    trained = {p.name: p.asnumpy() for p in trainer.model.trainable_params()}
    assert sorted(loaded_adapters) == sorted(trained) and len(trained) == 7 * 2
    for name, value in trained.items():
        np.testing.assert_array_equal(loaded_adapters[name], value, err_msg=name)


# -- the plan and the memory planner -------------------------------------------------------------------------------

def test_plan_splits_codes_and_scales_with_their_layer(qwen2_dir):
    model = build_model(load_config(qwen2_dir))
    apply_lora(model, LoraConfig(rank=4, target_modules=["q_proj", "o_proj"], quantize_base="nf4",
                                 double_quant=True))
    parallel = ParallelConfig(data_parallel=2, model_parallel=2)
    applied = {op.path: op.strategy for op in apply_plan(model, parallel)}
    layer = "model.layers.0"
    assert applied[f"{layer}.self_attn.q_proj.weight.gather"] == ((1, 1), (2, 1))  # column-parallel: rows
    assert applied[f"{layer}.self_attn.q_proj.weight.scale"] == ((2, 1, 1), (2, 1, 1))
    assert applied[f"{layer}.self_attn.o_proj.weight.gather"] == ((1, 1), (1, 2))  # row-parallel: blocks
    assert applied[f"{layer}.mlp.down_proj.weight.scale_absmax"] == ((1, 2), (1, 2))
    assert applied[f"{layer}.self_attn.q_proj.matmul"] == ((2, 1), (2, 1))
    assert parameter_layout(f"{layer}.self_attn.o_proj.weight.codes", 2, parallel) == (None, "mp")
    assert parameter_layout(f"{layer}.mlp.up_proj.weight.absmax", 2, parallel) == ("mp", None)
    assert parameter_layout(f"{layer}.mlp.up_proj.weight.nested_absmax", 1, parallel) == (None,)
    assert parameter_layout(f"{layer}.mlp.down_proj.weight.absmax", 1, parallel) == (None,)  # int8: per row


def test_plan_requires_whole_blocks_on_every_device(qwen2_dir):
    config = load_config(qwen2_dir)  # down_proj: 192 columns, 96 per device with model_parallel 2
    parallel = ParallelConfig(model_parallel=2)
    validate_plan(config, parallel, 2)
    with pytest.raises(ConfigError, match=r"model.layers.N.mlp.down_proj.weight \(128 x 192\): each device holds "
                                          r"96 columns over model_parallel 2, not whole blocks of 64"):
        validate_plan(config, parallel, 2, quantization=NF4)


def test_memory_planner_counts_codes_and_scales(qwen2_dir):
    config = load_config(qwen2_dir)
    parallel = ParallelConfig(model_parallel=2)
    work = Workload(seq_length=16, micro_batch_size=1, compute_bytes=2)
    lora = LoraConfig(rank=4, target_modules=["q_proj"], quantize_base="nf4", double_quant=True)
    terms = estimate_memory(config, parallel, work, lora)[0].terms
    # independently: per (out, in) weight 0.5 byte per weight + 1 per block of 64, split over the 2 devices, and
    # the replicated fp32 nested scale per 256 blocks and offset
    expected = 0
    for out, inp in [(128, 128), (64, 128), (64, 128), (128, 128), (192, 128), (192, 128), (128, 192)]:
        blocks = out * inp // 64
        expected += (out * inp / 2 + blocks) / 2 + 4 * math.ceil(blocks / 256) + 4
    assert terms["quantized weights"] == pytest.approx(expected, rel=1e-12)
    unquantized = estimate_memory(config, parallel, work, LoraConfig(rank=4, target_modules=["q_proj"]))[0].terms
    linear = sum(out * inp for out, inp in [(128, 128), (64, 128), (64, 128), (128, 128), (192, 128), (192, 128),
                                            (128, 192)]) / 2
    assert unquantized["fp32 weights"] - terms["fp32 weights"] == 4 * linear  # no float copy of a quantized weight
    assert unquantized["compute weights"] - terms["compute weights"] == 2 * linear


def test_msllm_plan_fits_the_32b_qlora_config_on_one_server():
    result = CliRunner().invoke(msllm, ["plan", str(REPO / "configs/qwen2_5_32b_qlora_8k_8p.yaml"), "--device-num", "8",
                                        "--hbm-gb", "58"])
    print(result.output)
    assert result.exit_code == 0, result.output
    assert "in nf4 with double quantization" in result.output and "-> fits" in result.output
    quantized = next(line for line in result.output.splitlines() if line.strip().startswith("quantized weights"))
    # 32 layers per pipeline stage x 487.6M linear weights x (0.5 + 1/64 + 4/16384) bytes, over model_parallel 2
    assert abs(float(quantized.split()[-1]) - 32 * 487.6e6 * (0.5 + 1 / 64 + 4 / 16384) / 2 / 2 ** 30) < 0.01


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_planner_names_the_weights_the_model_quantizes(family):
    """The planner's and msllm-ckpt quantize's rule from the config = the layers quantize_model swaps."""
    if family == "qwen2":
        hf = {**transformers.Qwen2Config(**reference.QWEN2).to_dict(), "architectures": ["Qwen2ForCausalLM"]}
    else:
        hf = {**transformers.DeepseekV3Config(**reference.DEEPSEEK_V3).to_dict(),
              "architectures": ["DeepseekV3ForCausalLM"]}
    model = _representative_model(config_from_hf(hf), Kernels())  # every linear's in_features a multiple of 64
    quantize_model(model, NF4)
    swapped = {name.rsplit(".", 1)[0] for name in model.parameters_dict() if name.endswith(".weight.codes")}
    assert swapped == {name for name, _ in quantized_weight_shapes(model.config)}


# -- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    (dict(quantize_base="nf3"), "quantize_base"), (dict(double_quant=True), "double_quant: needs quantize_base: nf4"),
    (dict(quantize_base="int8", double_quant=True), "double_quant"),
])
def test_bad_lora_quantization_fields_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(LoraConfig, fields, "train.yaml: lora").validate()


def test_unquantizable_layers_and_methods_are_named(module_dir):
    reference.qwen2(module_dir / "default_qwen2")  # intermediate_size 96: down_proj rows are not whole blocks
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.down_proj.weight: a weight of shape \[64, 96\] "
                                          r"cannot be quantized: in_features must be a multiple of the block size 64"):
        AutoModelForCausalLM.from_pretrained(module_dir / "default_qwen2", quantization="nf4")
    with pytest.raises(ConfigError, match="quantization: method: 'fp4' is not one of nf4, int8"):
        AutoModelForCausalLM.from_pretrained(module_dir / "default_qwen2", quantization="fp4")


def test_shipped_qlora_config_reads_as_a_quantized_lora_job():
    raw = yaml.safe_load((REPO / "configs/qwen2_5_32b_qlora_8k_8p.yaml").read_text())
    assert from_dict(LoraConfig, raw["lora"], "lora").quantization == NF4_DQ

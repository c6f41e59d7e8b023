"""FP8 (float8_e4m3fn) weights with 128x128 block scales (weight_scale_inv), as DeepSeek-V3/R1 store them.

Reference: torch's float8_e4m3fn -> float32 cast, and DeepSeek's ``weight_dequant`` written in torch (fp32
multiply per block, then the cast to the target dtype). Every comparison is bit-exact.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckpt_tools.convert import E4M3FN, FP8_BLOCK, cast, dequantize_fp8
from tests import reference
from tests.ckpt_helpers import raw_tensors, run


def torch_weight_dequant(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """DeepSeek-V3 inference/kernel.py weight_dequant: y = x.float() * s per 128x128 block, stored as `dtype`."""
    rows, columns = weight.shape
    expanded = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :columns]
    return (weight.to(torch.float32) * expanded).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax scaling to e4m3fn's range (how DeepSeek's FP8 checkpoints were made)."""
    rows, columns = weight.shape
    blocks = (-(-rows // FP8_BLOCK), -(-columns // FP8_BLOCK))
    scale = torch.empty(blocks)
    for i in range(blocks[0]):
        for j in range(blocks[1]):
            block = weight[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            scale[i, j] = block.abs().max() / 448.0
    expanded = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :columns]
    return (weight / expanded).to(torch.float8_e4m3fn), scale


def test_e4m3fn_table_matches_torch_for_all_256_patterns():
    torch_values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    np.testing.assert_array_equal(E4M3FN, torch_values)  # NaN at 0x7f and 0xff on both sides


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (7, 129)])
@pytest.mark.parametrize("target", ["BF16", "F16", "F32"])
def test_dequantization_matches_reference_including_edge_blocks(shape, target):
    generator = torch.Generator().manual_seed(sum(shape))
    weight, scale = quantize(torch.randn(shape, generator=generator) * 3)
    scale = scale * torch.rand(scale.shape, generator=generator)  # blocks differ; not just amax/448
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[target]
    expected = torch_weight_dequant(weight, scale, torch_dtype)
    expected = expected.view(torch.int16).numpy().view(np.uint16) if target == "BF16" else expected.numpy()
    bits = weight.view(torch.uint8).numpy()
    values = dequantize_fp8(bits, scale.numpy(), 0, shape[1])
    np.testing.assert_array_equal(cast(values, "F32", target), expected)
    # In 128-row pieces, as the converter streams it: the same bits.
    pieces = [dequantize_fp8(bits[r:r + FP8_BLOCK], scale.numpy(), r, shape[1]) for r in range(0, shape[0], FP8_BLOCK)]
    np.testing.assert_array_equal(cast(np.concatenate(pieces), "F32", target), expected)


@pytest.fixture(scope="module")
def fp8_checkpoint(module_dir):
    """A tiny Qwen2 whose linear weights are stored as FP8 + weight_scale_inv, as DeepSeek-V3 stores its own; and
    the bf16 bits torch's weight_dequant gives for each tensor."""
    model = reference.qwen2(module_dir / "qwen2")
    state, expected = {}, {}
    for name, param in model.state_dict().items():
        if param.ndim == 2 and "proj" in name:
            weight, scale = quantize(param)
            state[name], state[name + "_scale_inv"] = weight, scale
            expected[name] = torch_weight_dequant(weight, scale, torch.bfloat16).view(torch.int16).numpy()
        else:
            state[name] = param.contiguous()
            expected[name] = param.to(torch.bfloat16).view(torch.int16).numpy()
    source = module_dir / "qwen2_fp8"
    source.mkdir()
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((module_dir / "qwen2" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (source / "config.json").write_text(json.dumps(config))
    return source, expected


def test_fp8_checkpoint_converts_to_dequantized_weights_without_scales(fp8_checkpoint, module_dir):
    source, expected = fp8_checkpoint
    out = module_dir / "qwen2_fp8_ms"
    result = run("hf2ms", source, out, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    converted = raw_tensors(out)
    assert not any(name.endswith("_scale_inv") for name in converted)
    assert sorted(converted) == sorted(expected)
    for name, bits in expected.items():
        assert converted[name] == ("BF16", bits.tobytes()), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("dtype", [None, "fp32"])  # as stored (FP8 -> bf16, the rest as it is), or all fp32
def test_verify_dequantizes_an_fp8_original_as_hf2ms_does(fp8_checkpoint, module_dir, dtype):
    """The original against its conversion agrees exactly (its scales belong to the weights, not missing tensors);
    one dequantized element off by one unit in the last place is found."""
    source, _ = fp8_checkpoint
    out = module_dir / f"qwen2_fp8_{dtype}"
    options = ["--dtype", dtype] if dtype else []
    assert run("hf2ms", source, out, *options, "--format", "safetensors").exit_code == 0
    result = run("verify", source, out)
    assert result.exit_code == 0, result.output
    assert "FP8 weight(s) dequantized, max |Δ| = 0, 0 mismatch(es)" in result.output
    from safetensors.torch import load_file
    [shard] = out.glob("*.safetensors")
    tensors = load_file(shard)
    name = "model.layers.0.mlp.down_proj.weight"
    bits = tensors[name].view({torch.bfloat16: torch.int16, torch.float32: torch.int32}[tensors[name].dtype])
    bits[0, 0] += 1  # one unit in the last place of the stored dtype
    save_file(tensors, shard, metadata={"format": "ms"})
    result = run("verify", source, out)
    assert result.exit_code == 1 and f"{name}: max |Δ|" in result.output, result.output

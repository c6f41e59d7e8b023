"""msllm-ckpt hf2ms / ms2hf / verify / inspect on tiny Qwen2 and Qwen3 (tests/reference.py).

References: transformers (loading and logits), torch's float32 -> bfloat16 cast, mindspore.save_checkpoint and
mindspore.load_checkpoint. Round trips are compared bit for bit; logits in mindspore_llm within
3e-6 * max|logit| (measured 4.2e-7), transformers' logits of a round-tripped model exactly.
"""
import json
import zlib

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from ckpt_tools import writer
from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.checkpoint import CkptFile, bf16_bits_to_float32
from tests import reference
from tests.ckpt_helpers import raw_tensors, run

# Mindformers 1.x names of layer 0 for Qwen2 (research/qwen2_5, qkv_concat=False), written out by hand.
MINDFORMERS_QWEN2 = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.layers.0.self_attn.q_proj.weight": "model.layers.0.attention.wq.weight",
    "model.layers.0.self_attn.q_proj.bias": "model.layers.0.attention.wq.bias",
    "model.layers.0.self_attn.k_proj.bias": "model.layers.0.attention.wk.bias",
    "model.layers.0.self_attn.v_proj.weight": "model.layers.0.attention.wv.weight",
    "model.layers.0.self_attn.o_proj.weight": "model.layers.0.attention.wo.weight",
    "model.layers.0.mlp.gate_proj.weight": "model.layers.0.feed_forward.w1.weight",
    "model.layers.0.mlp.up_proj.weight": "model.layers.0.feed_forward.w3.weight",
    "model.layers.0.mlp.down_proj.weight": "model.layers.0.feed_forward.w2.weight",
    "model.layers.0.input_layernorm.weight": "model.layers.0.attention_norm.weight",
    "model.layers.0.post_attention_layernorm.weight": "model.layers.0.ffn_norm.weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}


@pytest.fixture(scope="module")
def models(module_dir):
    """name -> (HF directory, torch model): fp32 Qwen2 (untied), fp32 Qwen3 (tied), and Qwen2 saved in bf16."""
    out = {"qwen2": (module_dir / "qwen2", reference.qwen2(module_dir / "qwen2")),
           "qwen3": (module_dir / "qwen3", reference.qwen3(module_dir / "qwen3"))}
    bf16 = reference.qwen2(module_dir / "qwen2_bf16_src", seed=1).to(torch.bfloat16)
    bf16.save_pretrained(module_dir / "qwen2_bf16")
    out["qwen2_bf16"] = (module_dir / "qwen2_bf16", bf16)
    return out


@pytest.fixture(scope="module")
def converted(models, module_dir):
    """hf2ms output directory per model (default: .ckpt, our names, dtype as stored)."""
    out = {}
    for name, (directory, _) in models.items():
        result = run("hf2ms", directory, module_dir / f"{name}_ms")
        assert result.exit_code == 0, result.output
        out[name] = module_dir / f"{name}_ms"
    return out


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "qwen2_bf16"])
def test_round_trip_hf_ms_hf_is_bit_identical(name, models, converted, module_dir):
    back = module_dir / f"{name}_back"
    assert run("ms2hf", converted[name], back).exit_code == 0
    original = raw_tensors(models[name][0])
    assert raw_tensors(back) == original
    assert {dtype for dtype, _ in original.values()} == {"BF16" if name.endswith("bf16") else "F32"}
    assert run("verify", models[name][0], back).exit_code == 0


def test_ckpt_output_loads_in_mindspore_with_the_same_values(models, converted):
    files = sorted(converted["qwen2"].glob("*.ckpt"))
    loaded = {k: v for f in files for k, v in ms.load_checkpoint(str(f)).items()}
    hf = {name: np.frombuffer(data, np.float32) for name, (_, data) in raw_tensors(models["qwen2"][0]).items()}
    assert sorted(loaded) == sorted(hf)
    for name, param in loaded.items():
        np.testing.assert_array_equal(param.asnumpy().reshape(-1), hf[name], err_msg=name)


def test_ckpt_writer_is_byte_identical_to_mindspore_save_checkpoint(converted, module_dir):
    ours = sorted(converted["qwen2_bf16"].glob("*.ckpt"))
    assert len(ours) == 1
    params = ms.load_checkpoint(str(ours[0]))
    ms.save_checkpoint([{"name": n, "data": p} for n, p in params.items()], str(module_dir / "reference.ckpt"))
    assert ours[0].read_bytes() == (module_dir / "reference.ckpt").read_bytes()


def test_tensors_split_into_ckpt_slices_load_and_round_trip(models, module_dir, monkeypatch):
    """MindSpore splits tensors over 512 MB into consecutive Values of one tag; shrunk to 1000 bytes here."""
    monkeypatch.setattr(writer, "CKPT_SLICE_BYTES", 1000)
    out = module_dir / "qwen2_sliced"
    assert run("hf2ms", models["qwen2"][0], out).exit_code == 0
    [file] = out.glob("*.ckpt")
    assert len(CkptFile(file).tensors["model.embed_tokens.weight"]["segments"]) == -(-128 * 64 * 4 // 1000)
    hf = raw_tensors(models["qwen2"][0])
    loaded = ms.load_checkpoint(str(file))
    assert {name: param.asnumpy().tobytes() for name, param in loaded.items()} == {n: d for n, (_, d) in hf.items()}
    back = module_dir / "qwen2_sliced_back"
    assert run("ms2hf", out, back).exit_code == 0
    assert raw_tensors(back) == hf


def test_mindspore_safetensors_format_loads_in_mindspore(models, module_dir):
    out = module_dir / "qwen3_ms_safetensors"
    assert run("hf2ms", models["qwen3"][0], out, "--format", "safetensors").exit_code == 0
    [file] = out.glob("*.safetensors")
    loaded = ms.load_checkpoint(str(file), format="safetensors")
    hf = raw_tensors(models["qwen3"][0])
    assert sorted(loaded) == sorted(hf)
    for name, param in loaded.items():
        assert param.asnumpy().tobytes() == hf[name][1], name
    params = AutoModelForCausalLM.from_pretrained(out).parameters_dict()  # through mindspore_model.index.json
    assert {name: p.asnumpy().tobytes() for name, p in params.items()} == {n: d for n, (_, d) in hf.items()}


def test_bf16_cast_matches_torch(models, module_dir):
    out = module_dir / "qwen2_cast_bf16"
    assert run("hf2ms", models["qwen2"][0], out, "--dtype", "bf16").exit_code == 0
    ours = raw_tensors(out)
    for name, param in models["qwen2"][1].state_dict().items():
        expected = param.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        assert ours[name] == ("BF16", expected), name


def test_shards_respect_max_shard_size_and_the_index_covers_every_tensor(models, module_dir):
    out = module_dir / "qwen2_sharded"
    assert run("hf2ms", models["qwen2"][0], out, "--max-shard-size", "40KB").exit_code == 0
    shards = sorted(out.glob("*.ckpt"))
    index = json.loads((out / "mindspore_model.index.json").read_text())["weight_map"]
    assert len(shards) > 3 and sorted(set(index.values())) == [s.name for s in shards]
    largest_tensor = max(len(data) for _, data in raw_tensors(models["qwen2"][0]).values())
    for shard in shards:
        # Protobuf framing adds ~100 bytes per tensor; one tensor bigger than the limit gets its own shard.
        names_in_shard = [n for n, f in index.items() if f == shard.name]
        assert shard.stat().st_size <= max(40_000, largest_tensor) + 100 * len(names_in_shard), shard
    assert raw_tensors(out) == raw_tensors(models["qwen2"][0])


def test_manifest_records_shape_dtype_and_crc32(models, converted):
    manifest = json.loads((converted["qwen2_bf16"] / "manifest.json").read_text())
    for name, (dtype, data) in raw_tensors(models["qwen2_bf16"][0]).items():
        entry = manifest["tensors"][name]
        assert entry["dtype"] == dtype and entry["crc32"] == f"{zlib.crc32(data):08x}"
        assert entry["shape"] == list(models["qwen2_bf16"][1].state_dict()[name].shape)


def test_mindformers_naming_round_trips(models, module_dir):
    mf = module_dir / "qwen2_mindformers"
    assert run("hf2ms", models["qwen2"][0], mf, "--naming", "mindformers").exit_code == 0
    names = set(raw_tensors(mf))
    assert set(MINDFORMERS_QWEN2.values()) <= names
    assert not any("self_attn" in n or "mlp" in n or "embed_tokens" in n for n in names)
    back = module_dir / "qwen2_mindformers_back"
    assert run("ms2hf", mf, back).exit_code == 0  # names detected as mindformers'
    assert raw_tensors(back) == raw_tensors(models["qwen2"][0])
    # verify matches names across namings through the table
    assert run("verify", models["qwen2"][0], mf).exit_code == 0


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_transformers_loads_ms2hf_output_without_missing_keys_and_same_logits(name, models, converted, module_dir):
    back = module_dir / f"{name}_for_transformers"
    assert run("ms2hf", converted[name], back).exit_code == 0
    if name == "qwen3":  # tied embeddings: no lm_head written
        assert "lm_head.weight" not in raw_tensors(back)
    # eager attention, as the reference model was built with (sdpa rounds differently)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True,
                                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor(reference.random_batch(128, 2, 10, seed=3)[0])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, models[name][1](ids).logits)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_converted_model_gives_reference_logits_in_mindspore_llm(name, models, converted):
    input_ids, mask, labels = reference.random_batch(128, 2, 10, seed=2)
    ref_logits, _, _ = reference.torch_logits_loss_grads(models[name][1], input_ids, mask, labels)
    model = AutoModelForCausalLM.from_pretrained(converted[name])
    logits = model(ms.Tensor(input_ids, ms.int32), ms.Tensor(mask, ms.int32)).asnumpy()
    assert np.abs(logits - ref_logits).max() <= 3e-6 * np.abs(ref_logits).max()


def test_pickle_is_converted_only_with_allow_pickle(models, module_dir):
    source = module_dir / "qwen2_pickle"
    source.mkdir()
    (source / "config.json").write_text((models["qwen2"][0] / "config.json").read_text())
    torch.save(models["qwen2"][1].state_dict(), source / "pytorch_model.bin")
    refused = run("hf2ms", source, module_dir / "from_pickle")
    assert refused.exit_code == 2 and "pytorch_model.bin" in refused.output and "--allow-pickle" in refused.output
    assert not (module_dir / "from_pickle").exists()
    assert run("hf2ms", source, module_dir / "from_pickle", "--allow-pickle").exit_code == 0
    assert raw_tensors(module_dir / "from_pickle") == raw_tensors(models["qwen2"][0])


def test_verify_reports_a_changed_and_a_missing_tensor(models, module_dir):
    state = {k: v.clone() for k, v in models["qwen2"][1].state_dict().items()}
    state["model.norm.weight"][3] += 0.5
    del state["model.layers.1.mlp.up_proj.weight"]
    changed = module_dir / "qwen2_changed"
    changed.mkdir()
    save_file(state, changed / "model.safetensors", metadata={"format": "pt"})
    result = run("verify", models["qwen2"][0], changed)
    assert result.exit_code == 1
    assert "model.norm.weight: max |Δ| = 0.5" in result.output
    assert "only in" in result.output and "model.layers.1.mlp.up_proj.weight" in result.output
    assert run("verify", models["qwen2"][0], changed, "--atol", "1").exit_code == 1  # still missing one


def test_verify_compares_across_dtypes_when_asked(models, module_dir):
    cast = module_dir / "qwen2_bf16_for_verify"
    assert run("hf2ms", models["qwen2"][0], cast, "--dtype", "bf16").exit_code == 0
    assert run("verify", models["qwen2"][0], cast).exit_code == 1  # dtype differs
    worst = max(np.abs(p.numpy() - p.to(torch.bfloat16).float().numpy()).max()
                for p in models["qwen2"][1].state_dict().values())
    assert run("verify", models["qwen2"][0], cast, "--ignore-dtype", "--atol", str(worst * 1.01)).exit_code == 0
    assert run("verify", models["qwen2"][0], cast, "--ignore-dtype", "--atol", str(worst * 0.99)).exit_code == 1


def test_inspect_counts_parameters_and_bytes(models, converted):
    state = models["qwen3"][1].state_dict()
    # Tied: the head shares the embedding, which is stored once.
    count = sum(p.numel() for n, p in state.items() if n != "lm_head.weight")
    result = run("inspect", converted["qwen3"])
    assert result.exit_code == 0
    assert result.output.strip().splitlines()[-1] == f"{len(state) - 1} tensors, {count:,} parameters, " \
                                                     f"{4 * count:,} bytes in 1 file(s)"
    assert "model.layers.1.self_attn.q_norm.weight\tF32\t[24]" in result.output


def test_bf16_values_in_mindspore_llm_are_the_stored_bits(converted, models):
    """from_pretrained on a bf16 .ckpt keeps the bf16 values exactly (fp32 parameters widen them losslessly)."""
    params = AutoModelForCausalLM.from_pretrained(converted["qwen2_bf16"]).parameters_dict()
    for name, (_, data) in raw_tensors(models["qwen2_bf16"][0]).items():
        expected = bf16_bits_to_float32(np.frombuffer(data, np.uint16))
        np.testing.assert_array_equal(params[name].asnumpy().reshape(-1), expected, err_msg=name)


def test_ms2hf_accepts_a_single_ckpt_file(models, converted, module_dir):
    [file] = converted["qwen3"].glob("*.ckpt")  # config.json is found beside it
    back = module_dir / "qwen3_from_file"
    assert run("ms2hf", file, back).exit_code == 0
    assert raw_tensors(back) == raw_tensors(models["qwen3"][0])

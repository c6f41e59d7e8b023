"""AutoModelForCausalLM.from_pretrained on the directory layouts users have, and `msllm generate`."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers

from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.checkpoint import bf16_bits_to_float32, float32_to_bf16_bits
from mindspore_llm.cli import main
from mindspore_llm.common import CheckpointError
from tests import reference


@pytest.fixture(scope="module")
def qwen2_dir(module_dir):
    directory = module_dir / "qwen2"
    model = reference.qwen2(directory)
    return directory, model


def params_of(model):
    return {p.name: p.asnumpy() for p in model.get_parameters()}


def test_sharded_safetensors_load_every_tensor(module_dir):
    directory = module_dir / "sharded"
    hf_model = reference.qwen3(directory)
    hf_model.save_pretrained(directory, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").exists()
    (directory / "model.safetensors").unlink(missing_ok=True)
    model = AutoModelForCausalLM.from_pretrained(directory)
    ours = params_of(model)
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight":  # tied: the embedding serves as the head
            continue
        np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)


def test_bf16_checkpoint_loads_exact_values(module_dir):
    directory = module_dir / "bf16"
    hf_model = reference.qwen2(directory)
    hf_model.to(torch.bfloat16).save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    expected = hf_model.model.layers[0].mlp.up_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(params_of(model)["model.layers.0.mlp.up_proj.weight"], expected)


def test_bf16_bit_conversion_rounds_to_nearest_even_like_torch():
    values = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    ours = bf16_bits_to_float32(float32_to_bf16_bits(values))
    np.testing.assert_array_equal(ours, torch.from_numpy(values).bfloat16().float().numpy())


def test_missing_tensor_is_named(qwen2_dir, tmp_path):
    directory, hf_model = qwen2_dir
    state = {k: v for k, v in hf_model.state_dict().items() if k != "model.layers.1.mlp.down_proj.weight"}
    from safetensors.torch import save_file
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.down_proj.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_shape_disagreeing_with_config_is_named(qwen2_dir, tmp_path):
    directory, _ = qwen2_dir
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.mlp.\w+_proj.weight has "
                                              r"shape \(\d+, \d+\), the model expects \(\d+, \d+\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_safetensors_is_named(qwen2_dir, tmp_path):
    directory, _ = qwen2_dir
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* \(truncated\?\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def word_tokenizer(vocab_size: int) -> Tokenizer:
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def test_generate_matches_transformers_greedy(qwen2_dir):
    directory, hf_model = qwen2_dir
    word_tokenizer(hf_model.config.vocab_size).save(str(directory / "tokenizer.json"))
    prompt_ids = [5, 17, 42, 9]
    result = CliRunner().invoke(main, ["generate", str(directory), "--prompt", " ".join(f"w{i}" for i in prompt_ids),
                                       "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
    generated = [int(word[1:]) for word in result.output.split()[len(prompt_ids):]]
    assert generated == expected


def test_generate_reports_a_bad_model_dir_without_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "tokenizer.json").write_text(word_tokenizer(8).to_str())
    result = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt", "w1"])
    assert result.exit_code == 2
    assert "config.json: invalid JSON" in result.output

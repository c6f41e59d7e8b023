"""Bad inputs to msllm-ckpt: each fails with exit code 2, a message naming the file and the tensor (or config
field), and leaves nothing behind in the output's parent directory."""
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

from tests import reference
from tests.ckpt_helpers import run


@pytest.fixture(scope="module")
def qwen2(module_dir):
    directory = module_dir / "qwen2"
    model = reference.qwen2(directory)
    return directory, {n: p.contiguous() for n, p in model.state_dict().items()}


def variant(tmp_path, qwen2, state=None, config=None):
    """A copy of the tiny Qwen2 with its tensors and/or config.json replaced."""
    directory, original = qwen2
    out = tmp_path / "src"
    shutil.copytree(directory, out)
    if state is not None:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (out / "config.json").write_text(json.dumps({**json.loads((directory / "config.json").read_text()), **config}))
    return out


def assert_fails(tmp_path, *args, fragments, dst_name="out"):
    dst = tmp_path / "outputs" / dst_name
    result = run(*args[:2], dst, *args[2:]) if args[0] in ("hf2ms", "ms2hf") else run(*args)
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    leftovers = list((tmp_path / "outputs").iterdir()) if (tmp_path / "outputs").exists() else []
    assert leftovers == [], leftovers


def test_shard_listed_in_the_index_but_missing(tmp_path, qwen2):
    source = tmp_path / "sharded"
    reference.qwen2(tmp_path / "unused").save_pretrained(source, max_shard_size="60KB")
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    gone = sorted(set(index.values()))[1]
    (source / gone).unlink()
    tensor = next(name for name, file in index.items() if file == gone)
    assert_fails(tmp_path, "hf2ms", source, fragments=["model.safetensors.index.json", gone, tensor])


def test_truncated_safetensors_file(tmp_path, qwen2):
    source = variant(tmp_path, qwen2)
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[:-1000])
    assert_fails(tmp_path, "hf2ms", source, fragments=["model.safetensors", "tensor ", "truncated"])


def test_truncated_ckpt_file(tmp_path, qwen2):
    ms_dir = tmp_path / "ms"
    assert run("hf2ms", qwen2[0], ms_dir).exit_code == 0
    [ckpt] = ms_dir.glob("*.ckpt")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:len(data) // 2])
    assert_fails(tmp_path, "ms2hf", ms_dir, fragments=[ckpt.name, "tensor model.", "cut short"])


def test_unknown_tensor_name(tmp_path, qwen2):
    state = {**qwen2[1], "model.layers.0.self_attn.rel_pos.weight": torch.zeros(4)}
    assert_fails(tmp_path, "hf2ms", variant(tmp_path, qwen2, state),
                 fragments=["model.safetensors", "model.layers.0.self_attn.rel_pos.weight", "unknown"])


def test_layer_beyond_num_hidden_layers(tmp_path, qwen2):
    state = {**qwen2[1], "model.layers.2.input_layernorm.weight": torch.ones(64)}
    assert_fails(tmp_path, "hf2ms", variant(tmp_path, qwen2, state),
                 fragments=["model.safetensors", "model.layers.2.input_layernorm.weight"])


def test_shape_disagrees_with_config(tmp_path, qwen2):
    source = variant(tmp_path, qwen2, config={"intermediate_size": 80})
    assert_fails(tmp_path, "hf2ms", source,
                 fragments=["model.safetensors: tensor model.layers.0.mlp.", "_proj.weight has shape [64, 96]",
                            "config.json implies [64, 80]"])


def test_missing_tensor(tmp_path, qwen2):
    state = {n: p for n, p in qwen2[1].items() if n != "model.layers.1.self_attn.k_proj.bias"}
    assert_fails(tmp_path, "hf2ms", variant(tmp_path, qwen2, state),
                 fragments=["model.safetensors", "missing 1", "model.layers.1.self_attn.k_proj.bias"])


def test_unsupported_dtype(tmp_path, qwen2):
    state = {**qwen2[1], "model.norm.weight": qwen2[1]["model.norm.weight"].to(torch.float8_e5m2)}
    assert_fails(tmp_path, "hf2ms", variant(tmp_path, qwen2, state),
                 fragments=["model.safetensors", "model.norm.weight", "unsupported dtype F8_E5M2"])


def test_integer_weight_is_an_unsupported_dtype(tmp_path, qwen2):
    state = {**qwen2[1], "model.norm.weight": qwen2[1]["model.norm.weight"].to(torch.int32)}
    assert_fails(tmp_path, "hf2ms", variant(tmp_path, qwen2, state),
                 fragments=["model.safetensors", "model.norm.weight", "unsupported dtype I32"])


def test_fp8_weight_without_its_scales(tmp_path, qwen2):
    state = {**qwen2[1], "model.layers.0.mlp.up_proj.weight":
             qwen2[1]["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)}
    assert_fails(tmp_path, "hf2ms", variant(tmp_path, qwen2, state),
                 fragments=["model.safetensors", "model.layers.0.mlp.up_proj.weight_scale_inv"])


def test_config_for_another_architecture(tmp_path, qwen2):
    source = variant(tmp_path, qwen2, config={"architectures": ["LlamaForCausalLM"]})
    assert_fails(tmp_path, "hf2ms", source, fragments=["config.json", "LlamaForCausalLM"])


def test_qwen3_config_for_qwen2_weights(tmp_path, qwen2, module_dir):
    reference.qwen3(module_dir / "qwen3")
    ms_dir = tmp_path / "ms"
    assert run("hf2ms", qwen2[0], ms_dir).exit_code == 0
    # Qwen3's head_dim 24 makes q_proj 96 x 64 as in Qwen2, but Qwen2's q bias is not a Qwen3 (no-bias) parameter.
    assert_fails(tmp_path, "ms2hf", ms_dir, "--config", module_dir / "qwen3" / "config.json",
                 fragments=["ckpt: tensor model.layers.0.self_attn.", "_proj.bias is not expected by", "qwen3"])


def test_pickle_refused_without_allow_pickle(tmp_path, qwen2):
    source = tmp_path / "pickle"
    source.mkdir()
    shutil.copy(qwen2[0] / "config.json", source)
    torch.save(qwen2[1], source / "pytorch_model.bin")
    assert_fails(tmp_path, "hf2ms", source, fragments=["pytorch_model.bin", "--allow-pickle"])
    assert_fails(tmp_path, "inspect", source, fragments=["pytorch_model.bin", "--allow-pickle"])


def test_existing_output_is_kept_without_overwrite(tmp_path, qwen2):
    dst = tmp_path / "outputs" / "out"
    dst.mkdir(parents=True)
    (dst / "keep.txt").write_text("mine")
    result = run("hf2ms", qwen2[0], dst)
    assert result.exit_code == 2 and str(dst) in result.output and "--overwrite" in result.output
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert run("hf2ms", qwen2[0], dst, "--overwrite").exit_code == 0
    assert not (dst / "keep.txt").exists() and any(dst.glob("*.ckpt"))
    # the replaced output was moved aside under a name of its own and is deleted in the background
    deadline = time.monotonic() + 60
    while len(list(dst.parent.iterdir())) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p.name for p in dst.parent.iterdir()] == ["out"]


def test_failure_while_writing_leaves_nothing(tmp_path, qwen2, monkeypatch):
    import ckpt_tools.convert as convert

    def failing(source):
        yield from original(source)
        if source.name == "model.layers.1.mlp.up_proj.weight":
            raise OSError("No space left on device")

    original = convert.tensor_data
    monkeypatch.setattr(convert, "tensor_data", failing)
    result = run("hf2ms", qwen2[0], tmp_path / "outputs" / "out")
    assert result.exit_code != 0 and isinstance(result.exception, OSError)
    assert list((tmp_path / "outputs").iterdir()) == []

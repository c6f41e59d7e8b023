"""Per-rank slices of a 2-way model-parallel run (as MindSpore's save_checkpoint writes them) -> `msllm-ckpt
merge-slices` / `ms2hf --strategy` give the full tensors bit for bit in a Hugging Face directory; `reshard` to
4-way gives each rank its block; bad inputs are named and leave nothing."""
import json

import mindspore as ms
import numpy as np
import pytest

from mindspore_llm.checkpoint import iter_tensors
from mindspore_llm.models.auto import AutoModelForCausalLM
from mindspore_llm.models.qwen import QwenConfig
from mindspore_llm.models.shapes import parameter_shapes
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.plan import parameter_layout, write_strategy_file
from tests.ckpt_helpers import run

CONFIG = QwenConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)


def block(array, layout, parts, index):
    for axis, name in enumerate(layout):
        if name == "mp":
            array = np.split(array, parts, axis=axis)[index]
    return array


@pytest.fixture(scope="module")
def slices(module_dir):
    """Full random weights, their 2-way model-parallel slices (as the ranks save them) and the strategy file."""
    rng = np.random.default_rng(0)
    full = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in parameter_shapes(CONFIG)}
    two_way = ParallelConfig(model_parallel=2)
    for rank in range(2):
        (module_dir / "slices" / f"rank_{rank}").mkdir(parents=True)
        params = [{"name": name, "data": ms.Tensor(block(a, parameter_layout(name, a.ndim, two_way), 2, rank))}
                  for name, a in full.items()]
        ms.save_checkpoint(params, str(module_dir / "slices" / f"rank_{rank}" / "net.ckpt"))
    write_strategy_file(CONFIG, two_way, module_dir / "mp2.ckpt")
    hf = CONFIG.to_hf()
    (module_dir / "config.json").write_text(json.dumps(hf))
    return module_dir, full


def test_ms2hf_merges_slices_with_the_strategy_file(slices):
    directory, full = slices
    result = run("ms2hf", directory / "slices", directory / "hf", "--strategy", directory / "mp2.ckpt",
                 "--config", directory / "config.json")
    assert result.exit_code == 0, result.output
    merged = {name: file.float32(name) for name, file in iter_tensors(directory / "hf")}
    assert set(merged) == set(full)
    for name, array in full.items():
        np.testing.assert_array_equal(merged[name], array, err_msg=name)


def test_merge_slices_writes_a_loadable_hugging_face_directory(slices):
    directory, full = slices
    result = run("merge-slices", directory / "slices", directory / "full", "--strategy", directory / "mp2.ckpt",
                 "--config", directory / "config.json", "--quiet")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(directory / "full")
    for name, array in full.items():
        np.testing.assert_array_equal(model.parameters_dict()[name].asnumpy(), array, err_msg=name)


def test_reshard_to_four_way(slices):
    directory, full = slices
    write_strategy_file(CONFIG, ParallelConfig(model_parallel=4), directory / "mp4.ckpt")
    result = run("reshard", directory / "slices", directory / "mp4", "--src-strategy", directory / "mp2.ckpt",
                 "--dst-strategy", directory / "mp4.ckpt")
    assert result.exit_code == 0, result.output
    rank3 = ms.load_checkpoint(str(next((directory / "mp4" / "rank_3").glob("*.ckpt"))))
    name = "model.layers.1.self_attn.q_proj.weight"
    layout = parameter_layout(name, 2, ParallelConfig(model_parallel=4))
    np.testing.assert_array_equal(rank3[name].asnumpy(), block(full[name], layout, 4, 3))


@pytest.mark.parametrize("command", ["merge-slices", "ms2hf"])
def test_missing_rank_is_named_and_nothing_is_written(slices, tmp_path, command):
    directory, _ = slices
    (tmp_path / "slices" / "rank_0").mkdir(parents=True)
    (tmp_path / "slices" / "rank_0" / "net.ckpt").write_bytes((directory / "slices/rank_0/net.ckpt").read_bytes())
    result = run(command, tmp_path / "slices", tmp_path / "out", "--strategy", directory / "mp2.ckpt",
                 "--config", directory / "config.json")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "1 rank directories hold" in result.output and "model.embed_tokens.weight" in result.output
    assert not (tmp_path / "out").exists()
    (tmp_path / "slices" / "rank_1").mkdir()  # there, but empty
    result = run(command, tmp_path / "slices", tmp_path / "out", "--strategy", directory / "mp2.ckpt",
                 "--config", directory / "config.json")
    assert result.exit_code == 2 and "rank_1: no *.safetensors or *.ckpt weights found" in result.output

"""The command lines as a user meets them: every option explained, examples for the main jobs, versions, clean
errors (exit 2, one line, no traceback) for an empty prompt and missing slices, chat prompts through the model's
template, numbers that YAML 1.1 reads as strings."""

import click
import pytest
from click.testing import CliRunner

from ckpt_tools.cli import main as ckpt_main
from mindspore_llm.cli import main
from mindspore_llm.data import TINY_ASSETS
from mindspore_llm.data.chat import render_generation_prompt
from mindspore_llm.models.auto import build_model
from mindspore_llm.models.config import config_from_yaml_section
from mindspore_llm.tokenizer import load_tokenizer
from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import load_train_config
from tests.ckpt_helpers import run
from tests.test_trainer import tiny_raw_config, write_yaml


def commands(group: click.Group, prefix: str):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")
        elif not command.hidden:
            yield f"{prefix} {name}", command


@pytest.mark.parametrize("cli, name", [(main, "msllm"), (ckpt_main, "msllm-ckpt")])
def test_every_option_has_help_text(cli, name):
    silent = [f"{path} {option.opts[0]}" for path, command in commands(cli, name) for option in command.params
              if isinstance(option, click.Option) and not option.help]
    assert not silent


def test_msllm_help_shows_the_main_jobs():
    text = CliRunner().invoke(main, ["--help"]).output
    for line in ("msllm train configs/", "msllm plan configs/", "msllm preprocess --data-config",
                 "msllm generate ", "msllm-ckpt --help"):
        assert line in text, line


def test_msllm_ckpt_version():
    result = CliRunner().invoke(ckpt_main, ["--version"])
    assert result.exit_code == 0 and "version 0.1.0" in result.output


def test_msllm_ckpt_help_states_each_commands_memory():
    text = CliRunner().invoke(ckpt_main, ["--help"]).output
    assert "64 MB working chunks" in text and "transform_checkpoints" in text
    merge = " ".join(CliRunner().invoke(ckpt_main, ["merge-slices", "-h"]).output.split())
    assert "memory stays flat in the model's size" in merge
    reshard = " ".join(CliRunner().invoke(ckpt_main, ["reshard", "-h"]).output.split())
    assert "holds the whole model in memory" in reshard


def test_ms2hf_strategy_with_bad_input_is_a_clean_error(tmp_path):
    """(A missing rank's slices are named: tests/test_ckpt_slices.py.)"""
    (tmp_path / "slices").mkdir()
    strategy = tmp_path / "strategy.ckpt"
    strategy.write_bytes(b"")
    result = run("ms2hf", tmp_path / "slices", tmp_path / "out", "--strategy", strategy)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: ") and "config.json" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_model_dir(module_dir):
    """A random 1-layer Qwen2 on the shipped (ChatML) tokenizer, as a training run's final/ directory."""
    config = config_from_yaml_section(
        dict(architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=32, intermediate_size=64,
             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
             tie_word_embeddings=True), "model")
    return checkpointing.save_model_directory(build_model(config), config, module_dir / "tiny", TINY_ASSETS)


def test_generate_with_an_empty_prompt_is_a_clean_error(tiny_model_dir):
    result = CliRunner().invoke(main, ["generate", str(tiny_model_dir), "--prompt", "  "])
    assert result.exit_code == 2 and "--prompt: empty" in result.output and isinstance(result.exception, SystemExit)


def test_generate_chat_in_fp16_prints_the_reply_to_the_template_prompt(tiny_model_dir, monkeypatch):
    """--chat renders the prompt as transformers' apply_chat_template(add_generation_prompt=True) would and prints
    only the new tokens; --compute-dtype reaches the model."""
    from mindspore_llm.generation import GenerationConfig, Generator, decode_completions, stop_token_ids
    from mindspore_llm.models.auto import AutoModelForCausalLM

    loaded = []
    from_pretrained = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kwargs: loaded.append(kwargs) or from_pretrained(path, **kwargs))
    result = CliRunner().invoke(main, ["generate", str(tiny_model_dir), "--prompt", "What is 2 + 3?", "--chat",
                                       "--compute-dtype", "fp16", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert loaded == [{"compute_dtype": "fp16"}]
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = render_generation_prompt(tokenizer, [{"role": "user", "content": "What is 2 + 3?"}])
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    model = from_pretrained(tiny_model_dir, compute_dtype="fp16")
    stops = stop_token_ids(model.config, tokenizer, tiny_model_dir)
    greedy = Generator(model, GenerationConfig(4, eos_token_id=stops), 1, len(prompt)).generate([prompt])
    assert result.output == decode_completions(tokenizer, greedy, stops)[0] + "\n"


def test_yaml_1_1_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `lr: 1e-5` as the string "1e-5"; float fields take it as the number it spells."""
    raw = tiny_raw_config(tmp_path)
    path = write_yaml(tmp_path / "train.yaml", raw)
    path.write_text(path.read_text().replace("lr: 0.003", "lr: 1e-5").replace("min_lr: 0.0003", "min_lr: 3E-6"))
    assert "lr: 1e-5" in path.read_text()
    config = load_train_config(path)
    assert (config.schedule.lr, config.schedule.min_lr) == (1e-5, 3e-6)
    path.write_text(path.read_text().replace("lr: 1e-5", "lr: fast"))
    with pytest.raises(Exception, match="schedule.lr: expected a number, got 'fast'"):
        load_train_config(path)

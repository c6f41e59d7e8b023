"""The ``msllm`` command."""
from __future__ import annotations

import sys

import click

from mindspore_llm.config_utils import ConfigError


class UserError(click.ClickException):
    """Bad input: printed as one clear line, exit code 2."""
    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mindspore_llm")
def main():
    """mindspore_llm: train, fine-tune and convert Qwen2/2.5/3 and DeepSeek-V3/R1 models with MindSpore.

    \b
    Examples:
      msllm generate ./my-qwen --prompt "Hello" --max-new-tokens 20
      msllm-ckpt --help            checkpoint conversion (Hugging Face <-> MindSpore)
    """


def set_graph_mode(device_target: str = "CPU") -> None:
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, device_target=device_target)


@main.command()
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True),
              help="tokenizer.json or sentencepiece .model (default: found in MODEL_PATH).")
@click.option("--device-target", default="CPU", show_default=True, type=click.Choice(["CPU", "Ascend"]))
def generate(model_path, prompt, max_new_tokens, tokenizer_path, device_target):
    """Greedy-decode a continuation of PROMPT with the model in MODEL_PATH.

    MODEL_PATH is a Hugging Face model directory (config.json + safetensors) or one written by
    `msllm-ckpt hf2ms`. The model runs in graph mode; the sequence buffer is fixed-size, so it compiles once.
    """
    from mindspore_llm.checkpoint import CheckpointError
    from mindspore_llm.generation import greedy_generate
    from mindspore_llm.models.auto import AutoModelForCausalLM
    from mindspore_llm.tokenizer import TokenizerError, load_tokenizer

    set_graph_mode(device_target)
    try:
        tokenizer = load_tokenizer(tokenizer_path or model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path)
    except (ConfigError, CheckpointError, TokenizerError) as err:
        raise UserError(str(err)) from None
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt_ids = tokenizer.encode(prompt)
    new_ids = greedy_generate(model, prompt_ids, max_new_tokens, eos, pad)
    click.echo(tokenizer.decode(prompt_ids + new_ids))


@main.command()
@click.option("--data-config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A training YAML (its `data:` section is used) or a YAML holding only the data section.")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Directory to write: data.mindrecord shard(s) with .db indexes, and meta.json.")
@click.option("--shards", default=1, show_default=True, type=click.IntRange(1, 1000),
              help="Number of MindRecord files to spread the sequences over.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
def preprocess(data_config, output, shards, overwrite):
    """Tokenize and pack a data set once, offline, into MindRecord.

    Every rank of a (multi-node) job then reads the same sequences: point the training config's `data.path` at
    OUTPUT (keep kind, seq_length, packing and the reset_* flags as they were here; a mismatch is an error).
    Paths in the YAML are relative to the YAML file.

    \b
    Examples:
      msllm preprocess --data-config configs/tiny_sft.yaml --output data/tiny_sft
      msllm preprocess --data-config data.yaml --output /shared/pretrain --shards 8
    """
    from mindspore_llm.data import build_sequences, load_data_config, write_mindrecord

    try:
        cfg = load_data_config(data_config)
        arrays = build_sequences(cfg)
        write_mindrecord(arrays, cfg, output, shards, overwrite)
    except (ConfigError, FileExistsError) as err:
        raise UserError(str(err)) from None
    counted = int((arrays["labels"] != -100).sum())
    click.echo(f"wrote {output}: {len(arrays['input_ids'])} sequences of {cfg.seq_length} tokens, "
               f"{counted} counted in the loss, {shards} shard(s)")


if __name__ == "__main__":
    sys.exit(main())

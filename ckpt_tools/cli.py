"""The ``msllm-ckpt`` command (also ``python -m ckpt_tools``)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from mindspore_llm.common import UserError

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


class ByteSize(click.ParamType):
    """"4GB", "500MB", "2GiB" or a number of bytes (decimal units, as transformers' max_shard_size)."""
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        found = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", str(value).upper())
        if not found or found.group(2) not in _UNITS or float(found.group(1)) <= 0:
            self.fail(f"{value!r} is not a size like 4GB, 500MB or 2GiB", param, ctx)
        return int(float(found.group(1)) * _UNITS[found.group(2)])


def _run(function, *args, **kwargs):
    """Bad input (a checkpoint or config error, an existing output) becomes one clear line and exit code 2."""
    from mindspore_llm.common import CheckpointError, ConfigError

    try:
        return function(*args, **kwargs)
    except (CheckpointError, ConfigError, FileExistsError) as err:
        raise UserError(str(err)) from None


_common = [
    click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]),
                 help="Output dtype. Default: as stored (FP8 weights become bf16)."),
    click.option("--max-shard-size", type=ByteSize(), default="4GB", show_default=True,
                 help="Start a new output file when the next tensor would pass this size."),
    click.option("--overwrite", is_flag=True,
                 help="Replace DST if it exists (only once the new one is complete; the old one is deleted in the "
                      "background)."),
    click.option("--jobs", "-j", type=click.IntRange(min=1), default=2, show_default=True,
                 help="Tensors written at once, each by a thread, at its place in its shard (1 for a spinning "
                      "disk)."),
    click.option("--fsync", is_flag=True,
                 help="fsync every output file and directory before DST is renamed into place (as cp followed by "
                      "sync), so that DST never exists with short files, even after a power loss. Without it (the "
                      "default, as cp) the data may still be in the page cache when the command returns and reaches "
                      "the disk with the kernel's write-back; a crash before then can leave DST with short "
                      "files, as after cp (manifest.json holds every tensor's CRC32 to check against)."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
]


def common_options(function):
    for option in reversed(_common):
        function = option(function)
    return function


# How mindformers mcore checkpoints lay fused tensors out where the names do not show it; the defaults are
# mindformers' (mf_model_config.py). Set them as in the mindformers YAML the checkpoint was trained with.
_mcore_layout = [
    click.option("--use-contiguous-weight-layout-attention", "contiguous_attention", is_flag=True,
                 help="mindformers-mcore linear_qkv holds all q, then all k, then all v rows (default: per KV group "
                      "its q heads, then k, then v: Megatron's layout, mindformers' default)."),
    click.option("--use-interleaved-weight-layout-mlp/--no-use-interleaved-weight-layout-mlp", "interleaved_mlp",
                 default=True, show_default=True,
                 help="mindformers-mcore linear_fc1 (dense and shared-expert MLPs) interleaves gate and up rows "
                      "(mindformers' default); off: all gate rows, then all up rows."),
]


def mcore_layout_options(function):
    for option in reversed(_mcore_layout):
        function = option(function)
    return function


def layout_options(contiguous_attention: bool, interleaved_mlp: bool, qkv_concat: bool = False,
                   mla_qkv_concat: bool = False):
    from mindspore_llm.models.naming import LayoutOptions

    return LayoutOptions(qkv_concat=qkv_concat, mla_qkv_concat=mla_qkv_concat,
                         use_contiguous_weight_layout_attention=contiguous_attention,
                         use_interleaved_weight_layout_mlp=interleaved_mlp)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mindspore_llm")
def main():
    """Convert checkpoints between Hugging Face safetensors and MindSpore, tensor by tensor; FP8 (e4m3) weights
    with 128x128 block scales are dequantized on the way. Outputs appear only when complete.

    \b
    Memory, whatever the model size:
      hf2ms, ms2hf, verify, inspect   a few 64 MB working chunks (streamed tensor by tensor)
      shard, merge-slices,            a 64 MB window of one tensor at a time (read from the rank holding it)
      ms2hf --strategy
      merge-lora, export-peft         the largest adapted weight in float32 (+ the adapters)
      reshard                         the whole checkpoint: mindspore.parallel.transform_checkpoints

    \b
    Examples:
      msllm-ckpt hf2ms ./Qwen2.5-7B ./qwen-ms                      .ckpt shards for mindspore_llm
      msllm-ckpt hf2ms ./DeepSeek-V3 ./dsv3-ms --dtype bf16        FP8 -> bf16
      msllm-ckpt hf2ms ./Qwen2.5-7B ./qwen-mf --naming mindformers for mindformers 1.x
      msllm-ckpt hf2ms ./Qwen3-8B ./qwen3-mf --naming mindformers-mcore   for mindformers' mcore Qwen3
      msllm-ckpt ms2hf ./qwen-ms ./qwen-hf                         back to Hugging Face
      msllm-ckpt verify ./Qwen2.5-7B ./qwen-hf                     exit 1 on any difference
      msllm-ckpt inspect ./qwen-ms
      msllm-ckpt export-peft ./runs/lora/checkpoints/step_00001000/rank_0/train_state.ckpt ./adapter --alpha 16
      msllm-ckpt merge-lora ./Qwen2.5-7B ./adapter ./qwen-merged    LoRA folded into the weights
      msllm-ckpt quantize ./Qwen2.5-7B ./qwen-nf4 --double-quant    NF4 base for QLoRA and inference
      msllm-ckpt shard ./Qwen2.5-32B /shared/q32-16p --config train.yaml    every rank's slices
      msllm-ckpt merge-slices ./step_00001000 ./full --strategy ./strategy   per-rank slices -> Hugging Face
    """


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@common_options
@click.option("--naming", type=click.Choice(["mindspore_llm", "mindformers", "mindformers-mcore"]),
              default="mindspore_llm", show_default=True,
              help="Parameter names and layout to write. mindspore_llm: ours (= Hugging Face's), every family. "
                   "mindformers: mindformers 1.x (research/qwen2_5), Qwen2/2.5 only (add --qkv-concat for its fused "
                   "w_qkv / w_gate_hidden). mindformers-mcore: mindformers' Megatron-style models, Qwen3 (fused "
                   "linear_qkv and linear_fc1) and DeepSeek-V3 (as its convert_deepseekv3_hf_weight.py writes it: "
                   "stacked experts, interleaved linear_fc1).")
@click.option("--qkv-concat", is_flag=True,
              help="--naming mindformers: fuse q/k/v into attention.w_qkv (per KV group) and gate/up into "
                   "feed_forward.w_gate_hidden (interleaved), as mindformers' qkv_concat: true configs load them.")
@click.option("--mla-qkv-concat", is_flag=True,
              help="--naming mindformers-mcore, DeepSeek-V3: fuse q and kv down projections into "
                   "self_attention.linear_qkv (with linear_qb / linear_kvb / k_layernorm), mindformers' "
                   "mla_qkv_concat: true layout.")
@mcore_layout_options
@click.option("--format", "file_format", type=click.Choice(["ckpt", "safetensors"]), default="ckpt",
              show_default=True, help="MindSpore .ckpt, or MindSpore's safetensors flavour (with mindformers' "
                                      "param_name_map.json beside the index).")
@click.option("--allow-pickle", is_flag=True,
              help="Accept pytorch_model.bin (read with torch.load(weights_only=True)).")
def hf2ms(src, dst, dtype, max_shard_size, overwrite, jobs, fsync, quiet, naming, qkv_concat, mla_qkv_concat,
          contiguous_attention, interleaved_mlp, file_format, allow_pickle):
    """Hugging Face model directory SRC -> MindSpore checkpoint directory DST, tensor by tensor.

    DST gets mindspore_model-0000N-of-0000M.ckpt (or .safetensors) shards loadable by mindspore.load_checkpoint,
    mindspore_model.index.json (name -> file), manifest.json (shape, dtype, CRC32 per tensor), and config,
    tokenizer and generation files. `AutoModelForCausalLM.from_pretrained(DST)` loads it in any naming.

    \b
    Examples:
      msllm-ckpt hf2ms ./DeepSeek-R1-Distill-Qwen-32B ./r1-32b-ms --max-shard-size 2GB
      msllm-ckpt hf2ms ./Qwen2.5-72B ./qwen-mf --naming mindformers --qkv-concat
      msllm-ckpt hf2ms ./Qwen3-8B ./qwen3-mf --naming mindformers-mcore --format safetensors
    """
    from ckpt_tools.convert import LAYOUTS, convert

    if qkv_concat and naming != "mindformers":
        raise UserError("--qkv-concat is a mindformers 1.x layout: give --naming mindformers")
    if mla_qkv_concat and naming != "mindformers-mcore":
        raise UserError("--mla-qkv-concat is a mindformers-mcore layout: give --naming mindformers-mcore")
    _run(convert, src, dst, target_naming=naming, layout=LAYOUTS[(file_format, "ms")], dtype=dtype,
         max_shard_bytes=max_shard_size, overwrite=overwrite, allow_pickle=allow_pickle, quiet=quiet,
         description="hf2ms", workers=jobs, fsync=fsync,
         options=layout_options(contiguous_attention, interleaved_mlp, qkv_concat, mla_qkv_concat))


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(exists=True, path_type=Path),
              help="config.json (or its directory) of the model; default: the one in SRC.")
@click.option("--strategy", type=click.Path(exists=True, path_type=Path),
              help="SRC holds per-rank slices (rank_0/, rank_1/, ...) saved with these strategy files (the run's "
                   "strategy directory, or one merged file): the same as merge-slices.")
@common_options
@mcore_layout_options
def ms2hf(src, dst, config_path, strategy, dtype, max_shard_size, overwrite, jobs, fsync, quiet, contiguous_attention,
          interleaved_mlp):
    """MindSpore checkpoint SRC (directory or one .ckpt/.safetensors file) -> Hugging Face directory DST, tensor by
    tensor (with --strategy: per-rank slices in our naming, joined as merge-slices does).

    SRC may be in any naming, detected from its names: ours, mindformers 1.x with or without qkv_concat, or
    mindformers-mcore (Qwen3, DeepSeek-V3; for how its fused tensors are laid out where the names do not tell,
    see the two layout options). DST gets model-0000N-of-0000M.safetensors, model.safetensors.index.json and the
    config/tokenizer files; transformers' AutoModelForCausalLM.from_pretrained(DST) loads it. A tied lm_head is
    not written.

    \b
    A training checkpoint works too (ours or mindformers'): its optimizer and loss-scale entries (optimizer.*,
    adam_m.*, adam_v.*, global_step, scale_sense, ...) are left out with a notice naming them.

    \b
    Examples:
      msllm-ckpt ms2hf ./runs/sft/final ./my-qwen-hf --dtype bf16
      msllm-ckpt ms2hf ./runs/sft/checkpoints/step_00001000/rank_0 ./my-qwen-hf --config ./runs/sft/final
      msllm-ckpt ms2hf ./runs/32b/checkpoints/step_00001000 ./my-qwen-hf \\
          --strategy ./runs/32b/checkpoints/strategy --config ./Qwen2.5-32B
    """
    if strategy is not None:
        from ckpt_tools.slices import merge

        _run(merge, src, dst, strategy, config_path, dtype, max_shard_size, overwrite, quiet,
             layout_options(contiguous_attention, interleaved_mlp), jobs, fsync)
        return
    from ckpt_tools.convert import LAYOUTS, convert

    _run(convert, src, dst, target_naming="mindspore_llm", layout=LAYOUTS[("safetensors", "hf")], dtype=dtype,
         max_shard_bytes=max_shard_size, config_path=config_path, overwrite=overwrite, quiet=quiet,
         description="ms2hf", workers=jobs, fsync=fsync, options=layout_options(contiguous_attention, interleaved_mlp))


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--config", "train_config", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The training YAML whose model and parallel sections decide the slices.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Output dtype. Default: as stored (FP8 weights become bf16).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def shard(src, dst, train_config, dtype, overwrite, quiet):
    """Full checkpoint SRC (Hugging Face, fp32/bf16/FP8 with block scales) -> DST/rank_N/ holding exactly rank N's
    slices under the plan of TRAIN.yaml, for slow shared storage: each rank of the job then reads one directory of
    its own size. Set `model: {path: DST}` in the training YAML (the config.json beside the slices says the model).

    DST also gets slices.json (each parameter's shape and layout), strategy.ckpt (MindSpore's strategy file, all
    pipeline stages merged: `merge-slices` and `mindspore.parallel.transform_checkpoints` read it) and the config
    and tokenizer files. Streams a 64 MB window at a time: memory stays flat in the model's size.

    \b
    Example:
      msllm-ckpt shard ./DeepSeek-R1-Distill-Qwen-32B /shared/r1-32b-16p --config configs/qwen2_5_32b_sft_8k_16p.yaml
    """
    from ckpt_tools.slices import shard as shard_checkpoint

    _run(shard_checkpoint, src, dst, train_config, dtype, overwrite, quiet)
    click.echo(f"wrote {dst}")


@main.command("merge-slices")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--strategy", type=click.Path(exists=True, path_type=Path),
              help="The run's strategy directory (one file per rank or stage: every pipeline stage is merged) or "
                   "one merged file. Default: SRC/strategy.ckpt (`shard` output).")
@click.option("--config", "config_path", type=click.Path(exists=True, path_type=Path),
              help="config.json (or its directory) of the model; default: the one in SRC.")
@common_options
def merge_slices(src, dst, strategy, config_path, dtype, max_shard_size, overwrite, jobs, fsync, quiet):
    """Per-rank slices SRC/rank_N/*.ckpt (a semi-auto parallel run's checkpoint step, or `shard` output) -> Hugging
    Face directory DST with the full tensors (DeepSeek's stacked experts as per-expert tensors); optimizer and
    loss-scale entries are left out. Streams a 64 MB window of each tensor at a time from the rank holding it:
    memory stays flat in the model's size. `msllm-ckpt verify SRC-of-shard DST` is bit-identical.

    \b
    Examples:
      msllm-ckpt merge-slices ./runs/32b/checkpoints/step_00001000 ./32b-hf \\
          --strategy ./runs/32b/checkpoints/strategy --config ./Qwen2.5-32B
      msllm-ckpt merge-slices /shared/r1-32b-16p ./r1-32b-again
    """
    from ckpt_tools.slices import merge

    _run(merge, src, dst, strategy, config_path, dtype, max_shard_size, overwrite, quiet, workers=jobs, fsync=fsync)


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--src-strategy", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Strategy file the run that saved SRC wrote.")
@click.option("--dst-strategy", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Strategy file of the target layout (e.g. from a run on another device count).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new one is complete).")
def reshard(src, dst, src_strategy, dst_strategy, overwrite):
    """Per-rank slices SRC in one layout -> DST/rank_N/ slices in another (e.g. 16 devices -> 8), with MindSpore's
    transform_checkpoints, which holds the whole model in memory (merge-slices then shard streams instead).

    \b
    Example:
      msllm-ckpt reshard ./ckpt-16p ./ckpt-8p --src-strategy 16p.ckpt --dst-strategy 8p.ckpt
    """
    from ckpt_tools.slices import reshard as reshard_slices

    _run(reshard_slices, src, dst, src_strategy, dst_strategy, overwrite)


@main.command()
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@click.option("--atol", type=float, default=0.0, show_default=True, help="Largest allowed |Δ| per element.")
@click.option("--ignore-dtype", is_flag=True, help="Compare values only (e.g. fp32 against bf16 with --atol).")
@click.option("--config", "config_path", type=click.Path(exists=True, path_type=Path),
              help="config.json used to match names across namings when A or B has none beside it.")
@mcore_layout_options
def verify(a, b, atol, ignore_dtype, config_path, contiguous_attention, interleaved_mlp):
    """Compare checkpoints A and B (either format and naming) tensor by tensor: names, shapes, dtypes, max |Δ|,
    in 64 MB pieces. An FP8 original's weights are dequantized with their block scales as hf2ms does, so a
    DeepSeek-V3 checkpoint verifies against its conversion.

    Exit code 0 if they agree, 1 on any mismatch, 2 on unreadable input.

    \b
    Examples:
      msllm-ckpt verify ./Qwen2.5-7B ./qwen-ms                 bit-identical?
      msllm-ckpt verify ./qwen-fp32 ./qwen-bf16 --ignore-dtype --atol 1e-2
    """
    from ckpt_tools.compare import verify as compare

    report = _run(compare, a, b, atol, ignore_dtype, config_path, layout_options(contiguous_attention, interleaved_mlp))
    click.echo("\n".join(report.lines))
    if report.mismatches:
        sys.exit(1)


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--allow-pickle", is_flag=True, help="Read pytorch_model.bin (torch.load(weights_only=True)).")
def inspect(path, allow_pickle):
    """List the tensors of checkpoint PATH (file or directory, any format): name, dtype, shape; then totals.

    \b
    Example:
      msllm-ckpt inspect ./qwen-ms | tail -1
    """
    from ckpt_tools.compare import inspect as listing

    click.echo("\n".join(_run(listing, path, allow_pickle)))


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["nf4", "int8"]), default="nf4", show_default=True,
              help="nf4: QLoRA's 4-bit NormalFloat, one absmax per 64 weights; int8: one absmax per output row.")
@click.option("--double-quant", is_flag=True,
              help="nf4: store the absmax values in 8 bits too (QLoRA's double quantization, ~0.37 bit/weight less).")
@common_options
def quantize(src, dst, method, double_quant, dtype, max_shard_size, overwrite, jobs, fsync, quiet):
    """Model directory SRC -> DST with every linear layer's weight quantized, for QLoRA and inference.

    The weights of the decoder's linear layers become NF4 codes with their block scales (or int8 with row
    scales), computed exactly as bitsandbytes computes them; embeddings, norms and the LM head stay as stored
    (or --dtype). DST is written as transformers writes a bitsandbytes model (config.json quantization_config,
    model-0000N-of-0000M.safetensors): `AutoModelForCausalLM.from_pretrained(DST)` loads it quantized without
    SRC, and so does transformers with bitsandbytes installed. One weight is held in float32 at a time.

    \b
    Examples:
      msllm-ckpt quantize ./DeepSeek-R1-Distill-Qwen-32B ./r1-32b-nf4 --double-quant
      msllm-ckpt quantize ./Qwen2.5-7B ./qwen-7b-int8 --method int8 --dtype bf16
    """
    from ckpt_tools.quantize import quantize_checkpoint
    from mindspore_llm.quant import QuantizationConfig

    config = _run(QuantizationConfig.of, QuantizationConfig(method=method, double_quant=double_quant))
    manifest = _run(quantize_checkpoint, src, dst, config, dtype=dtype, max_shard_bytes=max_shard_size,
                    overwrite=overwrite, quiet=quiet, workers=jobs, fsync=fsync)
    click.echo(f"wrote {dst}: {manifest['total_size'] / 2 ** 20:.1f} MiB of tensors")


@main.command("export-peft")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--alpha", type=float, help="LoRA alpha the adapters were trained with (scaling = alpha / rank).")
@click.option("--config", "train_config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The training YAML: alpha and dropout are read from its `lora:` section.")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Recorded as lora_dropout.")
@click.option("--base", "base_model", help="base_model_name_or_path to record (e.g. Qwen/Qwen2.5-7B).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new one is complete).")
def export_peft(src, dst, alpha, train_config, dropout, base_model, overwrite):
    """LoRA adapters of checkpoint SRC -> PEFT adapter directory DST.

    SRC is any checkpoint holding model.*.lora_A.weight / lora_B.weight (a training checkpoint's
    train_state.ckpt, a saved model directory); the rank is read from the tensors. DST gets adapter_model.safetensors
    and adapter_config.json, which peft.PeftModel.from_pretrained(base_model, DST) loads.

    \b
    Example:
      msllm-ckpt export-peft ./runs/lora/final ./my-adapter --config train_lora.yaml --base Qwen/Qwen2.5-7B
    """
    from ckpt_tools.peft import export_peft_from_checkpoint
    from mindspore_llm.config_utils import from_dict, load_yaml
    from mindspore_llm.lora import LoraConfig

    if train_config is not None:
        section = _run(load_yaml, train_config).get("lora")
        if section is None:
            raise UserError(f"{train_config}: no `lora:` section")
        lora = _run(from_dict, LoraConfig, section, f"{train_config}: lora")
        alpha, dropout = lora.alpha, lora.dropout
    if alpha is None:
        raise UserError("give --alpha (the LoRA alpha of the run) or --config (its training YAML)")
    _run(export_peft_from_checkpoint, src, dst, alpha, dropout, base_model, overwrite)
    click.echo(f"wrote {dst}")


@main.command("merge-lora")
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@common_options
def merge_lora(base, adapter, dst, dtype, max_shard_size, overwrite, jobs, fsync, quiet):
    """Base model BASE + PEFT LoRA adapter ADAPTER -> Hugging Face model directory DST with merged weights.

    Each adapted weight becomes W + (B @ A) * lora_alpha / r (computed in float32, stored in the base's dtype or
    --dtype; memory: one such weight in float32); every other tensor is copied in 64 MB chunks. BASE is a Hugging
    Face directory or `msllm-ckpt hf2ms` output. DST loads with transformers' AutoModelForCausalLM.from_pretrained,
    no peft needed.

    \b
    Example:
      msllm-ckpt merge-lora ./Qwen2.5-7B ./my-adapter ./qwen-7b-merged --dtype bf16
    """
    from ckpt_tools.peft import merge_adapter

    _run(merge_adapter, base, adapter, dst, dtype=dtype, max_shard_bytes=max_shard_size, overwrite=overwrite,
         quiet=quiet, workers=jobs, fsync=fsync)


if __name__ == "__main__":
    sys.exit(main())

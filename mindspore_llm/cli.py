"""The ``msllm`` command."""
from __future__ import annotations

import os
import sys

import click

from mindspore_llm.common import ConfigError, UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mindspore_llm")
def main():
    """mindspore_llm: train, fine-tune and convert Qwen2/2.5/3 and DeepSeek-V3/R1 models with MindSpore.

    \b
    Examples:
      msllm train configs/tiny_qwen_sft.yaml                       train as the YAML says (msllm train -h)
      msllm train configs/tiny_qwen_sft.yaml --set train.steps=50 --resume
      msllm train configs/tiny_qwen_grpo.yaml                      GRPO from that SFT model (kind: grpo)
      msllm plan configs/qwen2_5_32b_sft_8k_16p.yaml --device-num 16 --hbm-gb 58   memory per device, fits?
      msllm preprocess --data-config configs/tiny_qwen_sft.yaml --output data/tiny_sft   tokenize once, offline
      msllm rehearse configs/qwen2_5_32b_sft_8k_16p.yaml           a cluster job's step, at toy size, here
      msllm generate ./runs/tiny_qwen_sft/final --prompt "What is 2 + 3?" --chat
      msllm eval runs/tiny_qwen_grpo/final --data tasks.jsonl --reward math_accuracy --num-samples 8
      msllm distill-topk configs/tiny_qwen_distill.yaml data/teacher_top64.safetensors --top-k 64
      msllm rank-table generate --servers 10.0.0.1,10.0.0.2 --devices 0-7 --output rank_table_16p.json
      msllm-ckpt --help            checkpoint conversion (Hugging Face <-> MindSpore)
    """


def _set_mindspore_verbosity(ctx, param, count):
    # GLOG_v is read when MindSpore starts, which the commands delay until they run (the package imports it lazily);
    # a GLOG_v the user set is kept unless -v asks for more
    if count:
        os.environ["GLOG_v"] = "2" if count == 1 else "1"
    else:
        os.environ.setdefault("GLOG_v", "3")
    return count


def verbosity_option(command):
    return click.option("-v", "--verbose", count=True, expose_value=False, is_eager=True,
                        callback=_set_mindspore_verbosity,
                        help="Show MindSpore's own log: -v its warnings, -vv its INFO lines too (very many). "
                             "Default: errors only; an explicit GLOG_v in the environment is kept.")(command)


def set_graph_mode(device_target: str = "CPU") -> None:
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, device_target=device_target)


DEVICE_TARGET = click.option("--device-target", default="CPU", show_default=True, type=click.Choice(["CPU", "Ascend"]),
                             help="Where the graphs run (Ascend: an NPU of this host).")


def _generation_options(command):
    """The sampling and batching options `generate` and `eval` share."""
    options = [
        click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 32768),
                     help="Stop a row after this many new tokens (or at an end-of-sequence token)."),
        click.option("--temperature", type=click.FloatRange(min=0),
                     help="0: greedy. Default: greedy, or 1.0 when several sequences are sampled per prompt."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                     help="Sample from the smallest set of tokens whose probability reaches this."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Sample from the k most likely tokens (0: all)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same samples."),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
                     help="Rows per generate call (the compiled batch shape)."),
        click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True),
                     help="tokenizer.json or sentencepiece .model (default: found in MODEL_PATH)."),
        click.option("--compute-dtype", default="fp32", show_default=True,
                     type=click.Choice(["fp32", "fp16", "bf16"]),
                     help="Dtype of the matmuls (weights are kept in fp32). bf16 needs Ascend: CPU kernels lack "
                          "bf16 matmul."),
        DEVICE_TARGET,
        verbosity_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_generation(model_path, tokenizer_path, compute_dtype, device_target):
    """(model, tokenizer, stop ids, pad id) for MODEL_PATH; bad inputs exit 2 with the file named."""
    from mindspore_llm.common import CheckpointError, TokenizerError
    from mindspore_llm.generation import stop_token_ids
    from mindspore_llm.models.auto import AutoModelForCausalLM
    from mindspore_llm.tokenizer import load_tokenizer

    set_graph_mode(device_target)
    try:
        tokenizer = load_tokenizer(tokenizer_path or model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, compute_dtype=compute_dtype)
    except (ConfigError, CheckpointError, TokenizerError) as err:
        raise UserError(str(err)) from None
    pad = next((i for i in (tokenizer.pad_token_id, model.config.pad_token_id) if i is not None), 0)
    return model, tokenizer, stop_token_ids(model.config, tokenizer, model_path), pad


def _generator(model, prompts, stops, pad, max_new_tokens, temperature, top_p, top_k, batch_size, sequences):
    from mindspore_llm.generation import GenerationConfig, Generator

    if temperature is None:
        temperature = 1.0 if sequences > 1 else 0.0
    if temperature == 0 and sequences > 1:
        raise UserError(f"{sequences} sequences per prompt with --temperature 0 would all be the same greedy "
                        f"one; sample with --temperature > 0")
    longest = max(len(ids) for ids in prompts)
    if longest + max_new_tokens > model.config.max_position_embeddings:
        raise UserError(f"--max-new-tokens: the longest prompt's {longest} tokens + {max_new_tokens} exceed the "
                        f"model's max_position_embeddings {model.config.max_position_embeddings}")
    config = GenerationConfig(max_new_tokens, temperature, top_k, top_p, stops, pad)
    rows = min(batch_size, len(prompts) * sequences)
    return Generator(model, config, rows, longest)


@main.command()
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", "prompts", multiple=True, help="Text to continue (repeatable; with --chat: the user's "
                                                          "message).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False),
              help='Prompts to run as a batch: .jsonl records with "prompt" or "messages" (rendered with the chat '
                   'template), or a text file with one prompt per line.')
@click.option("--chat", is_flag=True,
              help="Render --prompt and text-file prompts as a user turn with the model's chat template and its "
                   "generation prompt (as transformers' apply_chat_template(add_generation_prompt=True)); print "
                   "only the reply.")
@click.option("--num-return-sequences", default=1, show_default=True, type=click.IntRange(min=1),
              help="Sequences per prompt (sampled: needs --temperature > 0).")
@click.option("--output", type=click.Path(dir_okay=False),
              help="Also write every sequence to this .jsonl file (prompt, sequence, completion, token ids).")
@_generation_options
def generate(model_path, prompts, prompts_file, chat, num_return_sequences, output, max_new_tokens, temperature,
             top_p, top_k, seed, batch_size, tokenizer_path, compute_dtype, device_target):
    """Continue prompts with the model in MODEL_PATH: greedy, or sampled with --temperature/--top-p/--top-k.

    MODEL_PATH is a Hugging Face model directory (config.json + safetensors) or one written by
    `msllm-ckpt hf2ms` or a training run (its final/). Generation keeps a key/value cache and compiles two graphs
    once (prefill and one-token decode, for --batch-size rows); a row stops at the model's end-of-sequence tokens.

    \b
    Examples:
      msllm generate ./my-qwen --prompt "The capital of France is" --max-new-tokens 20
      msllm generate ./r1-distill --prompt "What is 2 + 3?" --chat --max-new-tokens 512 --device-target Ascend
      msllm generate ./my-qwen --prompts-file prompts.jsonl --temperature 0.7 --top-p 0.9 \\
          --num-return-sequences 4 --seed 1 --output samples.jsonl
    """
    import json
    from pathlib import Path

    from mindspore_llm.data.chat import render_generation_prompt
    from mindspore_llm.fileio import atomic_path
    from mindspore_llm.generation import decode_completions, generate_all
    from mindspore_llm.rl.prompts import load_prompts

    for text in prompts:
        if not text.strip():
            raise UserError("--prompt: empty; give the text to continue")
    model, tokenizer, stops, pad = _load_generation(model_path, tokenizer_path, compute_dtype, device_target)
    texts = list(prompts)
    rendered = []  # (token ids, whether the prompt was chat-rendered)
    try:
        if prompts_file and Path(prompts_file).suffix == ".jsonl":
            rendered += [(list(p.ids), True) for p in load_prompts(prompts_file, tokenizer, answers=False)]
        elif prompts_file:
            texts += [line for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    except (ConfigError, UnicodeDecodeError) as err:
        raise UserError(f"{prompts_file}: {err}") from None
    for text in texts:
        ids = (render_generation_prompt(tokenizer, [{"role": "user", "content": text}]) if chat
               else tokenizer.encode(text))
        rendered.append((ids, chat))
    if not rendered:
        raise UserError("give --prompt TEXT or --prompts-file FILE")
    for ids, _ in rendered:
        if not ids:
            raise UserError("a prompt encodes to no tokens")
    generator = _generator(model, [ids for ids, _ in rendered], stops, pad, max_new_tokens, temperature, top_p,
                           top_k, batch_size, num_return_sequences)
    result = generate_all(generator, [ids for ids, _ in rendered], seed, num_return_sequences)
    answers = decode_completions(tokenizer, result, stops)
    records = []
    for row, (new_ids, answer) in enumerate(zip(result.completions(), answers)):
        prompt_ids, chat_prompt = rendered[row // num_return_sequences]
        text = answer if chat_prompt else tokenizer.decode(prompt_ids + new_ids)
        if len(answers) > 1:
            click.echo(f"=== prompt {row // num_return_sequences + 1}, sequence {row % num_return_sequences + 1} ===")
        click.echo(text)
        records.append({"prompt": tokenizer.decode(prompt_ids), "sequence": row % num_return_sequences,
                        "completion": answer, "token_ids": new_ids})
    if output:
        with atomic_path(output) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@main.command("eval")
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help='.jsonl of {"prompt" or "messages", "answer"}, rendered with the chat template.')
@click.option("--reward", "rewards", multiple=True, default=("math_accuracy",), show_default=True,
              help="math_accuracy, format, exact_match or module:function (repeatable).")
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Samples per prompt: pass@1 is their mean, pass@k that any of the k passes.")
@click.option("--output", type=click.Path(dir_okay=False),
              help="Per-sample results (.jsonl). Default: <data file name>.eval.jsonl in the current directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_generation_options
def eval_command(model_path, data_path, rewards, num_samples, output, quiet, max_new_tokens, temperature, top_p,
                 top_k, seed, batch_size, tokenizer_path, compute_dtype, device_target):
    """Score the model in MODEL_PATH on the prompts of --data: generate (KV cache, batched), reward every sample,
    print pass@1 (and pass@k with --num-samples k) per reward; a sample passes when its reward is >= 1.

    \b
    Examples:
      msllm eval runs/tiny_qwen_grpo/final --data mindspore_llm/assets/tiny/reverse_words.jsonl --reward exact_match
      msllm eval ./R1-Distill-Qwen-32B --data math500.jsonl --reward math_accuracy --num-samples 8 \\
          --max-new-tokens 4096 --temperature 0.6 --top-p 0.95
    """
    import json
    from pathlib import Path

    from mindspore_llm.fileio import atomic_path
    from mindspore_llm.rl.evaluate import evaluate
    from mindspore_llm.rl.prompts import load_prompts
    from mindspore_llm.rl.rewards import RewardConfig

    model, tokenizer, stops, pad = _load_generation(model_path, tokenizer_path, compute_dtype, device_target)
    try:
        configs = [RewardConfig(name=name) for name in rewards]
        for cfg in configs:
            cfg.validate()
        prompts = load_prompts(data_path, tokenizer)
        generator = _generator(model, [p.ids for p in prompts], stops, pad, max_new_tokens, temperature, top_p,
                               top_k, batch_size, num_samples)
        result = evaluate(generator, tokenizer, prompts, configs, num_samples, seed, progress=not quiet)
    except ConfigError as err:
        raise UserError(f"--reward / --data: {err}") from None
    output = Path(output or f"{Path(data_path).stem}.eval.jsonl")
    with atomic_path(output) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows))
    click.echo(f"{len(prompts)} prompts x {num_samples} sample(s), {model_path}:")
    click.echo(result.report())
    click.echo(f"per-sample results: {output}")


@main.command()
@click.option("--data-config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A training YAML (its `data:` section is used) or a YAML holding only the data section.")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Directory to write: data.mindrecord shard(s) with .db indexes, and meta.json.")
@click.option("--shards", default=1, show_default=True, type=click.IntRange(1, 1000),
              help="Number of MindRecord files to spread the sequences over.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@verbosity_option
def preprocess(data_config, output, shards, overwrite):
    """Tokenize and pack a data set once, offline, into MindRecord.

    Every rank of a (multi-node) job then reads the same sequences: point the training config's `data.path` at
    OUTPUT (keep kind, seq_length, packing and the reset_* flags as they were here; a mismatch is an error).
    Paths in the YAML are relative to the YAML file.

    \b
    Examples:
      msllm preprocess --data-config configs/tiny_qwen_sft.yaml --output data/tiny_sft
      msllm preprocess --data-config data.yaml --output /shared/pretrain --shards 8
    """
    import logging

    from mindspore_llm.common import IGNORE_INDEX
    from mindspore_llm.data import build_sequences, load_data_config, write_mindrecord

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_data_config(data_config)
        arrays = build_sequences(cfg)
        write_mindrecord(arrays, cfg, output, shards, overwrite)
    except (ConfigError, FileExistsError) as err:
        raise UserError(str(err)) from None
    counted = int((arrays["labels"] != IGNORE_INDEX).sum())
    click.echo(f"wrote {output}: {len(arrays['input_ids'])} sequences of {cfg.seq_length} tokens, "
               f"{counted} counted in the loss, {shards} shard(s)")


def _set_option(command):
    return click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override one config value (repeatable); VALUE is read as YAML: 3, 1e-4, true, null, "
                             "bf16.")(command)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@_set_option
@click.option("--resume", is_flag=True, help="Continue from the latest complete checkpoint in the checkpoint dir.")
@click.option("--dry-run", is_flag=True,
              help="On an Ascend host: compile one rank's graph of the whole job on a single NPU without HCCL "
                   "(MindSpore's simulation) and report it; nothing trains, no data is read. Run this before "
                   "booking the cluster (on any machine: `msllm rehearse CONFIG`).")
@click.option("--rank", type=click.IntRange(0), default=None,
              help="With --dry-run: the rank to compile (default: the logging rank, the first of the last stage).")
@click.option("--deepspeed", "deepspeed_path", type=click.Path(exists=True, dir_okay=False),
              help="A DeepSpeed JSON: its zero_optimization block (stage, offload_optimizer.device, "
                   "stage3_param_persistence_threshold, bucket sizes) sets parallel.zero_stage, offload_optimizer, "
                   "optimizer_shard_threshold_kb and comm_fusion_mb; prints what maps and what is ignored. --set "
                   "wins over it.")
@verbosity_option
def train(config_path, overrides, resume, dry_run, rank, deepspeed_path):
    """Train (pretraining, SFT, or GRPO with `kind: grpo`) as CONFIG describes: logs, checkpoints, final
    model directory.

    Every step logs loss, learning rate, grad norm, loss scale, overflow and tokens/s to
    <output_dir>/logs (metrics.jsonl, TensorBoard events, loss.png at the end); GRPO adds rewards, accuracy,
    KL, clip fraction, entropy, completion length and rollout tokens/s (reward.png, and a sample of each step's
    rollouts in logs/rollouts/). Checkpoints go to
    <output_dir>/checkpoints every checkpoint.every_n_steps; SIGTERM or Ctrl-C finishes the current step,
    saves and exits 0 (in a distributed job every rank stops after the same step). The trained model is written to
    <output_dir>/final (config.json + safetensors).

    \b
    Examples:
      msllm train configs/tiny_qwen_sft.yaml
      msllm train configs/tiny_qwen_sft.yaml --set train.steps=50 --set schedule.lr=1e-3
      msllm train configs/tiny_qwen_sft.yaml --resume          # after an interruption
      msllm train configs/tiny_qwen_grpo.yaml                  # GRPO from the SFT model above
      msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True --log_dir=runs/msrun_logs \\
          python -m mindspore_llm.cli train configs/tiny_qwen_sft.yaml --set output_dir=runs/tiny_2p
      msllm train configs/qwen2_5_32b_sft_8k_16p.yaml --dry-run  # on one Ascend NPU, before the 16-NPU job
      msllm train configs/qwen2_5_32b_sft_8k_8p_offload.yaml --deepspeed ds_zero2_offload.json
    """
    import logging

    from mindspore_llm.common import CheckpointError
    from mindspore_llm.train.config import load_train_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if deepspeed_path:
            from mindspore_llm.parallel.zero import deepspeed_overrides

            mapping = deepspeed_overrides(deepspeed_path)
            click.echo(mapping.report(deepspeed_path), err=True)
            overrides = (*mapping.overrides, *overrides)
        config = load_train_config(config_path, overrides)
        if dry_run:
            click.echo(_dry_run(config, rank))
            return
        trainer = _trainer_class(config)(config, resume=resume)
    except (ConfigError, CheckpointError) as err:
        raise UserError(str(err)) from None
    result = trainer.run()
    if trainer.context.is_main:
        click.echo(result.summary())


def _trainer_class(config):
    """The trainer of the config's kind: ``Trainer``, or ``GRPOTrainer`` for ``kind: grpo``."""
    if config.kind == "grpo":
        from mindspore_llm.train.grpo import GRPOTrainer

        return GRPOTrainer
    from mindspore_llm.train.trainer import Trainer

    return Trainer


def _dry_run(config, rank) -> str:
    from mindspore_llm.parallel.context import simulation_environment

    if config.device_target != "Ascend":
        raise UserError(f"--dry-run compiles one rank of an Ascend job with MindSpore's simulation "
                        f"(MS_SIMULATION_LEVEL), which needs the Ascend backend: this config's device_target is "
                        f"{config.device_target} (MindSpore: \"Dryrun is not supported on CPU device for a "
                        f"distributed job\"). On this machine, `msllm rehearse CONFIG` runs the job's step at toy "
                        f"size.")
    parallel = config.parallel
    rank = parallel.device_num - parallel.device_num // parallel.pipeline_stages if rank is None else rank
    os.environ.update(simulation_environment(parallel, rank))
    try:
        trainer = _trainer_class(config)(config, dry_run=True)
    except RuntimeError as err:  # MindSpore without its Ascend backend: "Unsupported device target Ascend ..."
        raise UserError(f"--dry-run needs MindSpore's Ascend backend (the Ascend wheel and CANN): {err}"
                        .splitlines()[0]) from None
    return trainer.dry_run()


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@_set_option
@click.option("--steps", default=2, show_default=True, type=click.IntRange(1, 20),
              help="Training steps to compare.")
@verbosity_option
def rehearse(config_path, overrides, steps):
    """Rehearse the training job CONFIG on this machine (CPU): build its step as the trainer does on the cluster
    (pipeline, gradient reducer, optimizer-shard flag, stages, recompute, LoRA, distillation), at toy size, run it
    and compare loss, gradient norm, skip decisions and AdamW moments with the same toy model trained without the
    wrappers. Exit 1 on a mismatch, 2 on an invalid config or plan.

    The parallel, precision, train, lora and distill sections are used as they are; the model's dimensions, the
    sequence and the pipeline's micro-batches shrink (the output says how). The data files need not exist.

    \b
    Examples:
      msllm rehearse configs/qwen2_5_32b_sft_8k_16p.yaml
      msllm rehearse configs/deepseek_v3_671b_pretrain_4k_2048p.yaml --set parallel.zero_stage=3
    """
    from mindspore_llm.train.config import load_train_config

    set_graph_mode("CPU")
    try:
        config = load_train_config(config_path, overrides)
        from mindspore_llm.train.rehearse import rehearse as run_rehearsal

        result = run_rehearsal(config, config_path, steps, echo=click.echo)
    except ConfigError as err:
        raise UserError(str(err)) from None
    except Exception as err:  # noqa: BLE001 -- a step that fails to build or compile is what a rehearsal finds
        message = next((line for line in str(err).splitlines() if line.strip()), "")
        click.echo(f"  rehearsal FAILED: {type(err).__name__}: {message}", err=True)
        sys.exit(1)
    sys.exit(0 if result.ok else 1)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@_set_option
@click.option("--device-num", required=True, type=click.IntRange(1), help="Devices of the job.")
@click.option("--hbm-gb", default=64.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Memory one device may use (910B: 64; mindformers' recipes cap jobs at 58).")
@click.option("--compare-zero", is_flag=True,
              help="Also print one table of every parallel.zero_stage (0-3) x offload_optimizer (none, host) choice "
                   "for this job: device GB, host GB per server, PCIe time per step, DeepSpeed's estimate beside.")
@click.option("--pcie-gb-per-s", default=25.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Host<->device bandwidth per device and direction assumed for offload timing (GB/s).")
@click.option("--devices-per-server", default=8, show_default=True, type=click.IntRange(1),
              help="Devices per server, for the host memory of offloaded state.")
def plan(config_path, overrides, device_num, hbm_gb, compare_zero, pcie_gb_per_s, devices_per_server):
    """Print the parallel plan of a training CONFIG: device mesh, pipeline stages, op strategies and the
    per-device memory (parameters, gradients, optimizer states, activations) under its ZeRO stage and offload,
    host memory and PCIe traffic of what is offloaded, and whether it fits.

    Reads the model, parallel, data.seq_length, train, precision, lora and distill sections; nothing is
    compiled or allocated. Exit code 1 when a stage does not fit, 2 when the plan is invalid.

    \b
    Examples:
      msllm plan configs/qwen2_5_32b_sft_8k_16p.yaml --device-num 16 --hbm-gb 58
      msllm plan configs/qwen2_5_32b_sft_8k_8p_offload.yaml --device-num 8 --hbm-gb 58 --compare-zero
      msllm plan configs/deepseek_v3_671b_pretrain_4k_2048p.yaml --device-num 2048
      msllm plan configs/qwen2_5_32b_sft_8k_16p.yaml --device-num 16 --compare-zero \\
          --set parallel.data_parallel=2 --set parallel.pipeline_stages=1 --set parallel.micro_batch_num=1 ...
    """
    from mindspore_llm.parallel.memory import Offload, compare_zero_report, plan_report
    from mindspore_llm.train.config import load_plan_inputs

    offload = Offload(pcie_gb_per_s, devices_per_server)
    try:
        inputs = load_plan_inputs(config_path, overrides)
        text, fits = plan_report(inputs, device_num, hbm_gb, offload)
    except ConfigError as err:
        raise UserError(str(err)) from None
    click.echo(text)
    if compare_zero:
        click.echo(compare_zero_report(inputs, hbm_gb, offload))
    sys.exit(0 if fits else 1)


@main.group("rank-table")
def rank_table():
    """HCCL rank tables (version 1.0): generate one for your servers, or check one before a job.

    \b
    Examples:
      msllm rank-table generate --servers 10.0.0.1,10.0.0.2 --devices 0-7 --device-ips-file hccn/ \\
          --output rank_table_16p.json        # hccn/10.0.0.1.conf, hccn/10.0.0.2.conf: each server's hccn.conf
      msllm rank-table generate --servers 10.0.0.1 --devices 0-7 --device-ips-file /etc/hccn.conf
      msllm rank-table validate rank_tables/rank_table_16p.json --device-num 16
    """


@rank_table.command("generate")
@click.option("--servers", required=True, help="Host IPs of the servers, comma-separated, in rank order.")
@click.option("--devices", default="0-7", show_default=True, help="Device ids used on every server: 0-7, 0,1,2,3.")
@click.option("--device-ips-file", "device_ips_files", multiple=True, type=click.Path(exists=True),
              help="Each server's /etc/hccn.conf (its address_N device IPs), repeated once per server in the order "
                   "of --servers, or one directory holding <server IP>.conf for every server. Without it the IPs "
                   "are placeholders 192.168.(100+N).(server+1), which `validate` warns about.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write here (atomically); default: stdout.")
def rank_table_generate(servers, devices, device_ips_files, output):
    """Write an HCCL v1.0 rank table: ranks 0..N-1 over the servers in the order given."""
    import json

    from mindspore_llm.parallel import rank_table as rt

    server_ips = [s.strip() for s in servers.split(",") if s.strip()]
    try:
        ips = rt.read_device_ips(list(device_ips_files), server_ips) if device_ips_files else None
        table = rt.generate(server_ips, rt.parse_devices(devices), ips)
    except ConfigError as err:
        raise UserError(str(err)) from None
    warning = rt.placeholder_warning(table, "the generated table")
    if warning:
        click.echo(warning, err=True)
    if output:
        rt.write(table, output)
        click.echo(f"wrote {output}: {table['server_count']} server(s) x {len(table['server_list'][0]['device'])} "
                   f"devices", err=True)
    else:
        click.echo(json.dumps(table, indent=4))


def _validate_table(table_path, device_num, config_path):
    """(table, summary) of a rank table checked against `device_num` or a training YAML's parallel section."""
    from mindspore_llm.config_utils import from_dict, load_yaml
    from mindspore_llm.parallel import rank_table as rt
    from mindspore_llm.parallel.config import ParallelConfig

    if config_path:
        parallel = from_dict(ParallelConfig, load_yaml(config_path).get("parallel") or {}, f"{config_path}: parallel")
        if device_num is not None and device_num != parallel.device_num:
            raise ConfigError(f"--device-num {device_num} disagrees with {config_path}'s parallel section "
                              f"({parallel.device_num} devices)")
        device_num = parallel.device_num
    return rt.load(table_path, device_num)


def _table_options(command):
    command = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                           help="A training YAML: its parallel section's dp x mp x pp must equal the table's "
                                "device count.")(command)
    command = click.option("--device-num", type=click.IntRange(1), help="The device count the job needs.")(command)
    return click.argument("table_path", metavar="FILE", type=click.Path(dir_okay=False))(command)


@rank_table.command("validate")
@_table_options
def rank_table_validate(table_path, device_num, config_path):
    """Check FILE (JSON, fields, server_count, rank ids 0..N-1, unique device ids per server and device IPs,
    equal devices per server, the device count). Prints a summary; exit 2 with the problem otherwise."""
    from mindspore_llm.parallel import rank_table as rt

    try:
        table, summary = _validate_table(table_path, device_num, config_path)
    except ConfigError as err:
        raise UserError(str(err)) from None
    warning = rt.placeholder_warning(table, table_path)
    if warning:
        click.echo(warning, err=True)
    click.echo(f"{table_path}: ok, {len(summary['servers'])} server(s) x {summary['devices_per_server']} devices "
               f"= {summary['rank_size']} ranks")


@rank_table.command("local", hidden=True)
@_table_options
@click.option("--server-index", type=click.IntRange(0), help="This server's position in server_list.")
@click.option("--local-ips", default="", help="This host's addresses (space-separated), to find it by server_id.")
def rank_table_local(table_path, device_num, config_path, server_index, local_ips):
    """For scripts/run_distribute.sh: `validate`, then 'SERVER_INDEX RANK_SIZE' and one 'RANK_ID DEVICE_ID' line
    per device of this server (one process start instead of two)."""
    from mindspore_llm.parallel import rank_table as rt

    try:
        table, summary = _validate_table(table_path, device_num, config_path)
        click.echo(f"{table_path}: ok, {len(summary['servers'])} server(s) x {summary['devices_per_server']} "
                   f"devices = {summary['rank_size']} ranks", err=True)
        warning = rt.placeholder_warning(table, table_path)
        if warning:
            click.echo(warning, err=True)
        index = rt.find_server(table, table_path, server_index, local_ips.split())
    except ConfigError as err:
        raise UserError(str(err)) from None
    click.echo(f"{index} {summary['rank_size']}")
    for rank, device in rt.local_ranks(table, index):
        click.echo(f"{rank} {device}")


@main.command("distill-topk")
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--top-k", type=click.IntRange(1), help="Logits kept per token (default: distill.top_k of CONFIG).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1),
              help="Sequences per teacher forward pass.")
@DEVICE_TARGET
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@verbosity_option
def distill_topk(config_path, output, top_k, batch_size, device_target, quiet):
    """Run the teacher of training YAML CONFIG over its data set once and store each token's top-k teacher
    logits in OUTPUT (one safetensors file) for offline distillation (`distill: {mode: offline,
    teacher_logits: OUTPUT}`).

    The teacher is `distill.teacher`; the sequences are built from `data:` exactly as the run builds them (row r of
    OUTPUT is sequence r before sharding and shuffling). The teacher's tokenizer must be the data's. Size: rows x
    seq_length x k x 8 bytes. Paths in the YAML are relative to the YAML file.

    \b
    Example:
      msllm distill-topk configs/qwen_kd_offline.yaml data/teacher_top64.safetensors --top-k 64
    """
    from pathlib import Path

    from mindspore_llm.common import CheckpointError
    from mindspore_llm.config_utils import load_yaml
    from mindspore_llm.data import build_sequences, load_data_config
    from mindspore_llm.distill import check_same_tokenizer, write_teacher_topk
    from mindspore_llm.models.auto import AutoModelForCausalLM

    set_graph_mode(device_target)
    try:
        distill = load_yaml(config_path).get("distill") or {}
        if not distill.get("teacher"):
            raise ConfigError(f"{config_path}: distill.teacher: name the teacher model directory")
        teacher_dir = Path(config_path).parent / distill["teacher"]
        top_k = top_k or distill.get("top_k")
        if not top_k:
            raise ConfigError(f"{config_path}: distill.top_k: give it, or --top-k")
        data = load_data_config(config_path)
        check_same_tokenizer(data.tokenizer, teacher_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        arrays = build_sequences(data)
        rows = len(arrays["input_ids"])
        batches = ({key: arrays[key][start:start + batch_size]
                    for key in ("input_ids", "attention_mask", "position_ids") if key in arrays}
                   for start in range(0, rows, batch_size))
        write_teacher_topk(teacher, batches, output, top_k, rows, data.seq_length, str(teacher_dir), quiet)
    except (ConfigError, CheckpointError) as err:
        raise UserError(str(err)) from None
    click.echo(f"wrote {output}: top {top_k} teacher logits of {rows} sequences x {data.seq_length} tokens")


if __name__ == "__main__":
    sys.exit(main())

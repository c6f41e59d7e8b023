"""The ``msllm`` command."""
from __future__ import annotations

import sys

import click

from mindspore_llm.common import ConfigError, UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mindspore_llm")
def main():
    """mindspore_llm: train, fine-tune and convert Qwen2/2.5/3 and DeepSeek-V3/R1 models with MindSpore.

    \b
    Examples:
      msllm generate ./my-qwen --prompt "Hello" --max-new-tokens 20
      msllm train configs/tiny_qwen_sft.yaml && msllm train configs/tiny_qwen_grpo.yaml
      msllm eval runs/tiny_qwen_grpo/final --data mindspore_llm/assets/tiny/arithmetic_test.jsonl
      msllm-ckpt --help            checkpoint conversion (Hugging Face <-> MindSpore)
    """


def set_graph_mode(device_target: str = "CPU") -> None:
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, device_target=device_target)


def _generation_options(command):
    """The sampling and batching options `generate` and `eval` share."""
    options = [
        click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 32768)),
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
        click.option("--device-target", default="CPU", show_default=True, type=click.Choice(["CPU", "Ascend"])),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_generation(model_path, tokenizer_path, device_target):
    """(model, tokenizer, stop ids, pad id) for MODEL_PATH; bad inputs exit 2 with the file named."""
    from mindspore_llm.common import CheckpointError, TokenizerError
    from mindspore_llm.generation import stop_token_ids
    from mindspore_llm.models.auto import AutoModelForCausalLM
    from mindspore_llm.tokenizer import load_tokenizer

    set_graph_mode(device_target)
    try:
        tokenizer = load_tokenizer(tokenizer_path or model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path)
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
    config = GenerationConfig(max_new_tokens, temperature, top_k, top_p, stops, pad)
    rows = min(batch_size, len(prompts) * sequences)
    return Generator(model, config, rows, max(len(ids) for ids in prompts))


@main.command()
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", "prompts", multiple=True, help="Text to continue (repeatable).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False),
              help='Prompts to run as a batch: .jsonl records with "prompt" or "messages" (rendered with the chat '
                   'template), or a text file with one prompt per line.')
@click.option("--chat", is_flag=True, help="Render --prompt and text-file prompts as a user message with the "
                                           "chat template (the answer is printed without the prompt).")
@click.option("--num-return-sequences", default=1, show_default=True, type=click.IntRange(min=1),
              help="Sequences per prompt (sampled: needs --temperature > 0).")
@click.option("--output", type=click.Path(dir_okay=False),
              help="Also write every sequence to this .jsonl file (prompt, sequence, completion, token ids).")
@_generation_options
def generate(model_path, prompts, prompts_file, chat, num_return_sequences, output, max_new_tokens, temperature,
             top_p, top_k, seed, batch_size, tokenizer_path, device_target):
    """Continue prompts with the model in MODEL_PATH: greedy, or sampled with --temperature/--top-p/--top-k.

    MODEL_PATH is a Hugging Face model directory (config.json + safetensors) or one written by
    `msllm-ckpt hf2ms` / `msllm train`. Generation keeps a key/value cache and compiles two graphs once (prefill
    and one-token decode, for --batch-size rows); a row stops at the model's end-of-sequence tokens.

    \b
    Examples:
      msllm generate ./my-qwen --prompt "The capital of France is" --max-new-tokens 20
      msllm generate runs/tiny_qwen_sft/final --chat --prompt "What is 7 + 5?"
      msllm generate ./my-qwen --prompts-file prompts.jsonl --temperature 0.7 --top-p 0.9 \\
          --num-return-sequences 4 --seed 1 --output samples.jsonl
    """
    import json
    from pathlib import Path

    from mindspore_llm.data.chat import render_generation_prompt
    from mindspore_llm.fileio import atomic_path
    from mindspore_llm.generation import decode_completions, generate_all
    from mindspore_llm.rl.prompts import load_prompts

    model, tokenizer, stops, pad = _load_generation(model_path, tokenizer_path, device_target)
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
                 top_k, seed, batch_size, tokenizer_path, device_target):
    """Score the model in MODEL_PATH on the prompts of --data: generate (KV cache, batched), reward every sample,
    print pass@1 (and pass@k with --num-samples k) per reward; a sample passes when its reward is >= 1.

    \b
    Examples:
      msllm eval runs/tiny_qwen_grpo/final --data mindspore_llm/assets/tiny/arithmetic_test.jsonl
      msllm eval ./R1-Distill-Qwen-32B --data math500.jsonl --reward math_accuracy --num-samples 8 \\
          --max-new-tokens 4096 --temperature 0.6 --top-p 0.95
    """
    import json
    from pathlib import Path

    from mindspore_llm.fileio import atomic_path
    from mindspore_llm.rl.evaluate import evaluate
    from mindspore_llm.rl.prompts import load_prompts
    from mindspore_llm.rl.rewards import RewardConfig

    model, tokenizer, stops, pad = _load_generation(model_path, tokenizer_path, device_target)
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
    from mindspore_llm.common import IGNORE_INDEX
    from mindspore_llm.data import build_sequences, load_data_config, write_mindrecord

    try:
        cfg = load_data_config(data_config)
        arrays = build_sequences(cfg)
        write_mindrecord(arrays, cfg, output, shards, overwrite)
    except (ConfigError, FileExistsError) as err:
        raise UserError(str(err)) from None
    counted = int((arrays["labels"] != IGNORE_INDEX).sum())
    click.echo(f"wrote {output}: {len(arrays['input_ids'])} sequences of {cfg.seq_length} tokens, "
               f"{counted} counted in the loss, {shards} shard(s)")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value (repeatable); VALUE is read as YAML: 3, 1e-4, true, null, bf16.")
@click.option("--resume", is_flag=True, help="Continue from the latest complete checkpoint in the checkpoint dir.")
def train(config_path, overrides, resume):
    """Train (pretraining, SFT, or GRPO with `kind: grpo`) as CONFIG describes: logs, checkpoints, final model.

    Every step logs loss, learning rate, grad norm, loss scale, overflow and tokens/s to
    <output_dir>/logs (metrics.jsonl, TensorBoard events, loss.png at the end); GRPO adds rewards, accuracy,
    KL, clip fraction, entropy, completion length and rollout tokens/s (reward.png, and a sample of each step's
    rollouts in logs/rollouts/). Checkpoints go to
    <output_dir>/checkpoints every checkpoint.every_n_steps; SIGTERM or Ctrl-C finishes the current step,
    saves and exits 0. The trained model is written to <output_dir>/final (config.json + safetensors).

    \b
    Examples:
      msllm train configs/tiny_qwen_sft.yaml
      msllm train configs/tiny_qwen_sft.yaml --set train.steps=50 --set schedule.lr=1e-3
      msllm train configs/tiny_qwen_sft.yaml --resume          # after an interruption
      msllm train configs/tiny_qwen_grpo.yaml                  # GRPO from the SFT model above
      msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True --log_dir=runs/msrun_logs \\
          python -m mindspore_llm.cli train configs/tiny_qwen_sft.yaml --set output_dir=runs/tiny_2p
    """
    import logging

    from mindspore_llm.common import CheckpointError
    from mindspore_llm.train.config import load_train_config
    from mindspore_llm.train.grpo import GRPOTrainer
    from mindspore_llm.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        config = load_train_config(config_path, overrides)
        trainer = (GRPOTrainer if config.kind == "grpo" else Trainer)(config, resume=resume)
    except (ConfigError, CheckpointError) as err:
        raise UserError(str(err)) from None
    result = trainer.run()
    if trainer.context.is_main:
        click.echo(result.summary())


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--device-num", required=True, type=click.IntRange(1), help="Devices of the job.")
@click.option("--hbm-gb", default=64.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Memory one device may use (910B: 64; mindformers' recipes cap jobs at 58).")
def plan(config_path, device_num, hbm_gb):
    """Print the parallel plan of a training CONFIG: device mesh, pipeline stages, op strategies and the
    per-device memory (parameters, gradients, optimizer states, activations), and whether it fits.

    Reads the model, parallel, data.seq_length, train, precision, lora and distill sections; nothing is
    compiled or allocated. Exit code 1 when a stage does not fit, 2 when the plan is invalid.

    \b
    Examples:
      msllm plan configs/qwen2_5_32b_sft_8k_16p.yaml --device-num 16 --hbm-gb 58
      msllm plan configs/deepseek_v3_671b_pretrain_4k_2048p.yaml --device-num 2048
    """
    from mindspore_llm.parallel.memory import plan_report
    from mindspore_llm.train.config import load_plan_inputs

    try:
        text, fits = plan_report(load_plan_inputs(config_path), device_num, hbm_gb)
    except ConfigError as err:
        raise UserError(str(err)) from None
    click.echo(text)
    sys.exit(0 if fits else 1)


@main.group("rank-table")
def rank_table():
    """HCCL rank tables (version 1.0): generate one for your servers, or check one before a job.

    \b
    Examples:
      msllm rank-table generate --servers 10.0.0.1,10.0.0.2 --devices 0-7 --output rank_table_16p.json
      msllm rank-table generate --servers 10.0.0.1 --devices 0-7 --device-ips-file /etc/hccn.conf
      msllm rank-table validate rank_tables/rank_table_16p.json --device-num 16
    """


@rank_table.command("generate")
@click.option("--servers", required=True, help="Host IPs of the servers, comma-separated, in rank order.")
@click.option("--devices", default="0-7", show_default=True, help="Device ids used on every server: 0-7, 0,1,2,3.")
@click.option("--device-ips-file", type=click.Path(exists=True, dir_okay=False),
              help="/etc/hccn.conf of a (single) server: its address_N device IPs. Default: placeholders "
                   "192.168.(100+N).(server+1) -- replace them with your hccn.conf values.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write here (atomically); default: stdout.")
def rank_table_generate(servers, devices, device_ips_file, output):
    """Write an HCCL v1.0 rank table: ranks 0..N-1 over the servers in the order given."""
    import json

    from mindspore_llm.parallel import rank_table as rt

    try:
        ips = rt.read_hccn_conf(device_ips_file) if device_ips_file else None
        table = rt.generate([s.strip() for s in servers.split(",") if s.strip()], rt.parse_devices(devices), ips)
    except ConfigError as err:
        raise UserError(str(err)) from None
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
    try:
        _, summary = _validate_table(table_path, device_num, config_path)
    except ConfigError as err:
        raise UserError(str(err)) from None
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
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--device-target", default="CPU", show_default=True, type=click.Choice(["CPU", "Ascend"]))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
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

"""How a training job's compiled step is assembled, shared by the trainer and ``msllm rehearse``:

  - ``build_step``: AdamW on the trainable parameters and the ``TrainStep`` with the parallel context's wrappers
    (pipeline, gradient reducer, data-parallel sums), and the cell that is compiled (``AutoParallel`` under
    semi-auto parallel);
  - ``toy_model_config``: the same family at toy size, with every dimension the plan splits still divisible by its
    split, so the plan applies to it as to the real model;
  - ``check_plan_structure``: the op strategies of that toy model checked against the shapes its ops see with the
    job's kind of batch (``plan.check_strategies``), before the real graph is compiled.

Strategies depend on the cell types only (``plan.apply_plan`` dispatches on them), and whether a strategy fits its
input's rank, contracted dimensions and size-1 dimensions does not depend on the model's size; divisibility of the
real dimensions by their splits is ``plan.validate_plan``'s, on the real config. Together they make the checks
MindSpore's compiler makes, without compiling the real model.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.parallel.config import ParallelConfig

TOY_SEQ_LENGTH = 16


def build_step(trained, trainable_params, config, context, prompt_length: int | None = None):
    """(the step, the cell to compile) of training `trained` (the model, or a ``DistillationModel`` around it)
    under `context`, as the trainer builds it: a ``TrainStep``, or for ``kind: grpo`` a ``GRPOStep`` on rollouts of
    `prompt_length` prompt slots; AdamW in the job's device target's form (``optim.fused_by_default``), its moments
    in host memory with ``offload_optimizer: host``, the ZeRO stage on the ``AutoParallel`` cell
    (``context.wrap_step``)."""
    from mindspore_llm.train.optim import AdamW, fused_by_default
    from mindspore_llm.train.step import GRPOStep, TrainStep

    optimizer = AdamW(trainable_params, config.optimizer, config.schedule, config.parallel.offloads_optimizer,
                      fused=fused_by_default(config.device_target))
    arguments = (trained, optimizer, config.precision, config.train.gradient_accumulation_steps,
                 config.optimizer.clip_grad_norm)
    parallelism = context.step_parallelism(optimizer.parameters)
    if config.kind == "grpo":
        step = GRPOStep(*arguments, grpo=config.grpo, prompt_length=prompt_length, **parallelism)
    else:
        step = TrainStep(*arguments, **parallelism)
    return step, context.wrap_step(step, config.checkpoint_dir / "strategy", config.parallel)


def toy_seq_length(seq_length: int, parallel: ParallelConfig) -> int:
    """A short sequence that sequence parallelism still splits evenly."""
    split = parallel.model_parallel if parallel.sequence_parallel else 1
    return min(seq_length, math.lcm(TOY_SEQ_LENGTH, split))


def toy_model_config(model_config, parallel: ParallelConfig, vocab_size: int | None = None,
                     quantization_block: int | None = None):
    """`model_config`'s family and variant flags (biases, q/k norm, tied embeddings, rope scaling, dense/MoE layer
    mix) at toy size: heads and kv heads a multiple of model_parallel, FFN widths and (vocab_parallel) the vocabulary
    multiples of it, routed experts a multiple of expert_parallel and of the router groups, one layer per pipeline
    stage (at least two layers). `vocab_size` forces the vocabulary (a distillation teacher shares the student's).
    `quantization_block` (a QLoRA base): every linear layer's input width on one device (row-parallel layers are
    split on it) holds whole quantization blocks."""
    mp, ep, pp = parallel.model_parallel, parallel.expert_parallel, parallel.pipeline_stages
    c = model_config
    layers = max(pp, 2)
    block = quantization_block or 1
    fields = {"hidden_size": math.lcm(64, block), "num_hidden_layers": layers,
              "intermediate_size": math.lcm(max(64, 16 * mp), block * mp),
              "vocab_size": vocab_size or max(128, 32 * mp), "max_position_embeddings": max(64, TOY_SEQ_LENGTH),
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if hasattr(c, "kv_lora_rank"):  # DeepSeek-V3: MLA + DeepSeekMoE
        per_group = 2
        experts = math.lcm(c.n_group * per_group, ep)
        fields.update(num_attention_heads=max(2, mp), q_lora_rank=None if c.q_lora_rank is None else 16,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      first_k_dense_replace=min(c.first_k_dense_replace, 1), n_routed_experts=experts,
                      num_experts_per_tok=min(c.num_experts_per_tok, c.topk_group * experts // c.n_group),
                      moe_intermediate_size=max(16, 8 * mp))
    else:  # Qwen2/3: grouped-query attention (a group of 2 where the real model groups its heads)
        kv_heads = mp
        groups = 2 if c.num_attention_heads > c.num_key_value_heads else 1
        # o_proj's input, heads x head_dim, is split by model_parallel
        fields.update(num_attention_heads=kv_heads * groups, num_key_value_heads=kv_heads,
                      head_dim=math.lcm(8, block // math.gcd(block, groups)))
    toy = dataclasses.replace(c, **fields)
    toy.validate()
    return toy


def quantization_block(config) -> int | None:
    """The block size of the job's quantized (QLoRA) base, if it has one."""
    from mindspore_llm.quant import BLOCKSIZE

    return BLOCKSIZE if config.lora is not None and config.lora.quantization is not None else None


def toy_parallel(parallel: ParallelConfig, num_hidden_layers: int) -> ParallelConfig:
    """`parallel` for the toy model: the same mesh, flags and recompute modes; the stages split its layers evenly
    (an explicit stage_layers list counts the real model's layers) and a per-layer recompute list becomes the mode
    of each stage's first layer."""
    recompute = parallel.recompute
    if isinstance(recompute, list) and len(recompute) != parallel.pipeline_stages:
        firsts = np.cumsum([0] + parallel.layers_per_stage(len(recompute)))[:-1]
        recompute = [recompute[i] for i in firsts]
    toy = dataclasses.replace(parallel, stage_layers=None, recompute=recompute)
    if num_hidden_layers % toy.pipeline_stages:
        raise ValueError(f"{num_hidden_layers} toy layers do not split into {toy.pipeline_stages} stages")
    return toy


def toy_batch(rng: np.random.Generator, rows: int, seq_length: int, vocab_size: int, data) -> dict[str, np.ndarray]:
    """A batch shaped like the data pipeline's for `data` (a ``DataConfig``): two documents per row with their own
    positions and document-id attention mask where the data is packed or reset per document, a 0/1 mask with
    padding otherwise; SFT labels skip each document's prompt, pretraining labels every token."""
    input_ids = rng.integers(0, vocab_size, (rows, seq_length)).astype(np.int32)
    cut = rng.integers(seq_length // 4, 3 * seq_length // 4, (rows, 1))
    position = np.arange(seq_length)[None, :]
    documents = data.packing or (data.kind == "pretrain" and data.reset_attention)
    if documents:
        attention_mask = np.where(position < cut, 1, 2).astype(np.int32)
        starts = np.where(position < cut, 0, cut)
    else:  # one document, right-padded
        attention_mask = (position < seq_length - cut // 4).astype(np.int32)
        starts = np.zeros_like(position)
    resets = documents and (data.packing or data.reset_position_ids)
    position_ids = (position - starts if resets else np.broadcast_to(position, (rows, seq_length))).astype(np.int32)
    labels = np.where(attention_mask > 0, input_ids, IGNORE_INDEX).astype(np.int32)
    if data.kind == "sft":  # the first quarter of each document is its prompt
        start = np.where(position < cut, 0, cut)
        length = np.where(position < cut, cut, seq_length - cut)
        labels = np.where(position - start < length // 4, IGNORE_INDEX, labels).astype(np.int32)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "position_ids": np.ascontiguousarray(position_ids)}


def toy_rollouts(rng: np.random.Generator, rows: int, prompt_length: int, grpo, vocab_size: int
                 ) -> dict[str, np.ndarray]:
    """A batch shaped like GRPO's rollouts (``train.step.ROLLOUT_INPUTS``) for `grpo` (a ``GRPOConfig``): groups of
    grpo.num_generations left-padded prompts of `prompt_length` slots with completions of grpo.max_new_tokens slots
    ending at random lengths, rollout-time log-probabilities around a uniform policy's (so that some ratios leave
    the clip range), reference ones beside them, group advantages of random rewards and the aggregation's weights."""
    from mindspore_llm.generation import position_ids
    from mindspore_llm.rl.grpo import group_advantages, token_weights

    slots = grpo.max_new_tokens
    prompt_mask = (np.arange(prompt_length)[None, :] >= rng.integers(0, prompt_length, (rows, 1))).astype(np.int32)
    completion_mask = (np.arange(slots)[None, :] < rng.integers(1, slots + 1, (rows, 1))).astype(np.int32)
    mask = np.concatenate([prompt_mask, completion_mask], axis=1)
    uniform = -np.log(vocab_size)
    old_log_probs = (uniform + 0.3 * rng.standard_normal((rows, slots))) * completion_mask
    ref_log_probs = (uniform + 0.3 * rng.standard_normal((rows, slots))) * completion_mask
    rewards = rng.integers(0, 2, rows).astype(np.float32)
    return {"input_ids": (rng.integers(0, vocab_size, mask.shape) * mask).astype(np.int32),
            "attention_mask": mask, "position_ids": position_ids(mask),
            "old_log_probs": old_log_probs.astype(np.float32), "ref_log_probs": ref_log_probs.astype(np.float32),
            "advantages": group_advantages(rewards, grpo.num_generations, grpo.scale_rewards, grpo.advantage_eps),
            "token_weights": token_weights(completion_mask, grpo.loss_aggregation, slots, rows,
                                           float(completion_mask.sum()))}


def build_toy_model(model_config, parallel: ParallelConfig, precision, lora=None):
    """The toy twin as the trainer builds its model: built, LoRA applied, plan applied; (model, op strategies)."""
    from mindspore_llm.lora import apply_lora
    from mindspore_llm.models.auto import build_model
    from mindspore_llm.parallel.plan import apply_plan

    model = build_model(model_config, precision)
    if lora is not None:
        apply_lora(model, lora)
    return model, apply_plan(model, parallel)


def cluster_shapes(precision):
    """`precision` with its elementwise ops broadcasting in the op, as on Ascend (not CPU's same-shape operands):
    the shapes the cluster's op strategies see, which a strategy check traces."""
    return dataclasses.replace(precision, explicit_broadcast=False)


def check_plan_structure(config, context) -> int:
    """Check the job's op strategies on a toy twin of its model fed a batch of the job's kind (micro-batch rows,
    attention mask, positions); raise ConfigError naming every op whose strategy does not fit; return the number of
    op strategies checked."""
    from mindspore_llm.parallel.plan import check_strategies, trace_input_shapes

    parallel = config.parallel
    model_config = toy_model_config(config.model_config(), parallel, quantization_block=quantization_block(config))
    toy_parallel_config = toy_parallel(parallel, model_config.num_hidden_layers)
    model, applied = build_toy_model(model_config, toy_parallel_config,
                                     cluster_shapes(config.precision.model_precision()), config.lora)
    # one pipeline / accumulation micro-batch: micro_batch_size rows per data-parallel rank (semi-auto: full batch)
    rows = config.train.micro_batch_size * context.data_parallel // context.data_world_size
    seq = toy_seq_length(config.data.seq_length, parallel)
    import mindspore as ms

    batch = {k: ms.Tensor(v) for k, v in toy_batch(np.random.default_rng(0), rows, seq, model_config.vocab_size,
                                                   config.data).items()}
    shapes = trace_input_shapes(model, applied, lambda: model.loss_sum(
        batch["input_ids"], batch["labels"], batch["attention_mask"], batch["position_ids"]))
    check_strategies(applied, toy_parallel_config, shapes)
    return len(applied)

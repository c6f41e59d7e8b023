"""Per-device memory of a training job, before it starts: parameters, gradients, optimizer states, activations;
for GRPO also the reference policy, the rollout-time KV cache and the log-probability buffers.

The planner counts every parameter of a family from its dimensions (``parameter_shapes``: the one place that does,
for Qwen2/2.5/3 and DeepSeek-V3), divides each by its layout from ``plan.parameter_split``, and estimates
activations per layer from the sequence, micro-batch, tensor/sequence parallelism and the recompute mode.
The formulas and their assumptions are in docs/distributed.md; ``msllm plan`` prints the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mindspore_llm.checkpoint import layer_index
from mindspore_llm.distill import DistillConfig
from mindspore_llm.lora import LoraConfig, lora_parameter_shapes
from mindspore_llm.models.kernels import Kernels
from mindspore_llm.models.quantized import quantized_weight_shapes
from mindspore_llm.models.shapes import (count_parameters, expert_capacity, is_moe, layer_parameter_shapes,
                                         moe_layer, parameter_shapes, routed_slots_per_token)
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.plan import parameter_split, parameter_stages
from mindspore_llm.quant import QuantizationConfig
from mindspore_llm.rl.grpo import GRPOConfig

GB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ----------------------------------------------------------------------------------------------------------------
# Parameters


def _device_elements(name: str, shape: tuple[int, ...], parallel: ParallelConfig) -> float:
    return math.prod(shape) / math.prod(parameter_split(name, len(shape), parallel))


def _quantized_device_bytes(name: str, shape: tuple[int, int], quantization: QuantizationConfig,
                            parallel: ParallelConfig) -> float:
    """Bytes of one device's slice of the codes and scales holding weight `name` (split as ``plan`` splits them)."""
    return sum(math.prod(array_shape) * dtype.itemsize
               / math.prod(parameter_split(f"{name}.{array}", len(array_shape), parallel))
               for array, (array_shape, dtype) in quantization.shapes(*shape).items())


# ----------------------------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class Workload:
    seq_length: int
    micro_batch_size: int
    compute_bytes: int  # 2 for bf16/fp16 compute, 4 for fp32
    activation_bytes: int | None = None  # between matmuls: fp32 under O1; None: compute_bytes
    flash_attention: bool = False  # FlashAttentionScore: no S x S scores or mask stored (models/kernels.py)

    @property
    def stored_bytes(self) -> int:
        return self.compute_bytes if self.activation_bytes is None else self.activation_bytes


def layer_activation_bytes(config, index: int, work: Workload, parallel: ParallelConfig, mode: str,
                           lora: LoraConfig | None = None) -> float:
    """Bytes one micro-batch leaves stored in layer `index` on one device until its backward pass.

    Korthikanti et al. 2022 (arXiv:2205.05198) count s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit; this is the
    same bookkeeping adapted to these layers: no dropout masks, RMSNorm, SwiGLU (4 stored tensors of width
    intermediate_size), GQA/MLA widths for Q, K, V, an fp32 softmax output beside the 16-bit probabilities, and
    MoE as its training dispatch computes it (``moe_layer_activation_bytes``). docs/distributed.md.
    """
    s, b, e = work.seq_length, work.micro_batch_size, work.stored_bytes
    t = parallel.model_parallel
    sp = t if parallel.sequence_parallel else 1
    h, a = config.hidden_size, config.num_attention_heads
    tokens = s * b
    if mode in ("full", "swap"):  # only the layer input stays on the device (split along the sequence with SP)
        return e * tokens * h / sp
    replicated = 4 * e * tokens * h / sp  # both norm inputs, the attention input, the MLP input
    if hasattr(config, "kv_lora_rank"):
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        attention = e * tokens * a * (2 * qk + 2 * config.v_head_dim) / t  # Q, K, V, o_proj input
        latent = 2 * e * tokens * ((config.q_lora_rank or 0) + config.kv_lora_rank + config.qk_rope_head_dim)
        attention += latent  # the low-rank projections are replicated: not divided by t
    else:
        q, kv = a * config.head_dim, config.num_key_value_heads * config.head_dim
        attention = e * tokens * (2 * q + 2 * kv) / t  # Q, K, V, o_proj input
    if work.flash_attention:  # the kernel keeps its fp32 softmax max and sum, (heads, T, 8) each, for backward
        core = 2 * 8 * 4 * a * tokens / t
    else:
        core = 0.0 if mode == "selective" else (4 + e) * a * s * s * b / t  # fp32 softmax + 16-bit probabilities
    if moe_layer(config, index):
        mlp = moe_layer_activation_bytes(config, s, b, e, t)
    else:
        mlp = 4 * e * tokens * config.intermediate_size / t
    adapters = 0.0
    if lora is not None:
        targets = sum(1 for name, shape in layer_parameter_shapes(config, index)
                      if name.endswith(".weight") and len(shape) == 2 and lora.matches(name[: -len(".weight")]))
        adapters = e * tokens * lora.rank * targets
    return replicated + attention + core + mlp + adapters


def moe_layer_activation_bytes(config, seq_length: int, micro_batch_size: int, e: int, t: int) -> float:
    """Bytes an MoE block stores for backward, by its training dispatch (``moe_dispatch``): R = routed slots per
    token (``routed_slots_per_token``: E x C / S with a capacity, E dense, k grouped) times the T tokens are the
    rows the experts run on; each stores its input (width h) and gate, up, silu(gate), product (width I / t);
    the weighted combine keeps the gathered outputs (T k rows; dense: all E T); fp32 router tensors (logits,
    scores, biased scores, one-hot (T, k, E), and with a capacity the (B, E, S) sort keys, order and ranks);
    the shared experts' SwiGLU."""
    tokens = seq_length * micro_batch_size
    experts, top_k, i = config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size
    rows = routed_slots_per_token(config, seq_length) * tokens
    combined = experts * tokens if config.moe_dispatch == "dense" else top_k * tokens
    router = 4 * tokens * experts * (3 + top_k + (3 if config.moe_dispatch == "capacity" else 0))
    shared = 4 * e * tokens * i * config.n_shared_experts / t
    return rows * e * (config.hidden_size + 4 * i / t) + combined * e * config.hidden_size + router + shared


def attention_mask_bytes(work: Workload) -> float:
    """What the layers of one micro-batch share to mask attention: the fp32 (B, 1, S, S) bias; with flash attention
    the documents' int64 cumulative ends, (B * K,), K <= S (the kernel's constant (2048, 2048) uint8 causal mask is
    a constant of the graph, not per micro-batch: 4 MB, left to the margin)."""
    b, s = work.micro_batch_size, work.seq_length
    return 8 * b * s if work.flash_attention else 4 * b * s * s


def logits_bytes(config, work: Workload, parallel: ParallelConfig) -> float:
    """The LM head output and the loss's fp32 intermediates (logits, shifted logits, their exponentials)."""
    vp = parallel.model_parallel if parallel.vocab_parallel else 1
    return work.seq_length * work.micro_batch_size * config.vocab_size / vp * (work.compute_bytes + 12)


# ----------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass
class StageMemory:
    stage: int
    layers: list[int]
    terms: dict[str, float]  # bytes per device
    parameters: float  # elements per device (trainable + frozen)
    host: dict[str, float] = field(default_factory=dict)  # bytes per device kept in host memory (offload, swap)
    swapped_per_micro_batch: float = 0.0  # activation bytes one micro-batch swaps out (and back) per device

    def pcie_bytes(self, micro_batches: int) -> float:
        """Host <-> device bytes per step and device: offloaded optimizer state in and out once (the update reads
        and writes it), swapped activations out in forward and back in backward, every micro-batch."""
        return 2 * (self.host.get("optimizer states", 0.0) + micro_batches * self.swapped_per_micro_batch)
    # GRPO: bytes generation holds while the training step's transients (TRAINING_TRANSIENT) are not allocated
    rollout: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        transient = sum(self.terms.get(term, 0.0) for term in TRAINING_TRANSIENT)
        return sum(self.terms.values()) - transient + max(transient, sum(self.rollout.values()))

    @property
    def dominant(self) -> str:
        every = {**self.terms, **self.rollout}
        return max(every, key=every.get)

    def term(self, name: str) -> float:
        return self.terms.get(name, self.rollout.get(name, 0.0))


# what only the training step's forward and backward hold (generation reuses that memory)
TRAINING_TRANSIENT = ("activations", "recompute working set", "logits and loss")


def in_flight_micro_batches(parallel: ParallelConfig, stage: int) -> int:
    """1F1B: stage k holds the activations of (stages - k) micro-batches at its peak; no pipeline: one."""
    return min(parallel.pipeline_stages - stage, parallel.micro_batch_num)


def estimate_memory(config, parallel: ParallelConfig, work: Workload,
                    lora: LoraConfig | None = None, distill: DistillConfig | None = None,
                    teacher=None, grpo: GRPOConfig | None = None, rollouts: int = 0) -> list[StageMemory]:
    """Peak bytes per device of every pipeline stage (a stage's devices all hold the same amount).

    Parameters are fp32 master weights; with 16-bit compute (O2) each also has a compute-dtype copy.
    Gradients are fp32 (the parameters' dtype); AdamW holds two fp32 moments. The ZeRO stage shards them over the
    data-parallel replicas as MindSpore's parallel optimizer does (``_add_model_state``); offloaded moments and
    swapped activations are counted in ``StageMemory.host``.
    A quantized base (``lora.quantize_base``) holds its linear weights as codes and block scales (NF4: 0.5 byte per
    weight + 4 bytes per 64, or with double quantization 1 byte per 64 + 4 bytes per 64 x 256) and no
    compute-dtype copy; one layer at a time is dequantized (``dequant working set``: the fp32 weight and
    its int32 codes or float32 code values, 8 bytes per element of the largest local weight).
    """
    num_layers = config.num_hidden_layers
    layer_stages = parallel.stage_of_layers(num_layers)
    modes = parallel.recompute_of_layers(num_layers)
    copy_bytes = work.compute_bytes if work.compute_bytes < 4 else 0
    stages = [StageMemory(k, [i for i, s in enumerate(layer_stages) if s == k],
                          dict.fromkeys(("compute weights", "fp32 weights", "gradients", "optimizer states",
                                         "activations", "recompute working set", "logits and loss"), 0.0), 0.0)
              for k in range(parallel.pipeline_stages)]
    trainable = [(n, s, True) for n, s in (lora_parameter_shapes(config, lora) if lora else [])]
    frozen_base = lora is not None
    quantization = lora.quantization if lora is not None else None
    quantized = set(n for n, _ in quantized_weight_shapes(config)) if quantization is not None else set()
    if quantized:
        for stage in stages:
            stage.terms.update({"quantized weights": 0.0, "dequant working set": 0.0})
    layer_elements = [dict.fromkeys(range(num_layers), 0.0) for _ in stages]
    for name, shape, is_trainable in [(n, s, not frozen_base) for n, s in parameter_shapes(config)] + trainable:
        elements = _device_elements(name, shape, parallel)
        for k in parameter_stages(name, layer_stages, config.tie_word_embeddings):
            stages[k].parameters += elements
            if name in quantized:
                terms = stages[k].terms
                terms["quantized weights"] += _quantized_device_bytes(name, shape, quantization, parallel)
                terms["dequant working set"] = max(terms["dequant working set"], 8 * elements)
                continue
            if is_trainable:
                _add_model_state(stages[k], name, shape, elements, parallel, copy_bytes)
                index = layer_index(name)
                if index is not None:
                    layer_elements[k][index] += elements
            else:  # frozen: fp32 parameters, never sharded by the optimizer, no gradient or moments
                stages[k].terms["compute weights"] += copy_bytes * elements
                stages[k].terms["fp32 weights"] += 4 * elements
    if parallel.zero_stage == 3:
        for stage, per_layer in zip(stages, layer_elements):
            stage.terms["gathered layer (ZeRO-3)"] = zero3_gathered_bytes(max(per_layer.values()), copy_bytes)
    for stage in stages:
        flights = in_flight_micro_batches(parallel, stage.stage)
        stored = [layer_activation_bytes(config, i, work, parallel, modes[i], lora) for i in stage.layers]
        stage.terms["activations"] = flights * (sum(stored) + attention_mask_bytes(work))
        swapped = sum(layer_activation_bytes(config, i, work, parallel, "none", lora) - stored[j]
                      for j, i in enumerate(stage.layers) if modes[i] == "swap")
        if swapped:
            stage.swapped_per_micro_batch = swapped
            stage.host["swapped activations"] = flights * swapped
        # backward re-runs one layer's recomputed part at a time: what that layer did not store
        stage.terms["recompute working set"] = max(
            (layer_activation_bytes(config, i, work, parallel, "none", lora) - stored[j]
             for j, i in enumerate(stage.layers) if modes[i] != "none"), default=0.0)
        if stage.stage == parallel.pipeline_stages - 1:
            stage.terms["logits and loss"] = flights * logits_bytes(config, work, parallel)
    if distill is not None:
        _add_teacher(stages, distill, teacher, parallel, work, copy_bytes)
    if grpo is not None:
        _add_grpo(stages, config, grpo, rollouts, parallel, work, lora, copy_bytes)
    return stages


# ----------------------------------------------------------------------------------------------------------------
# ZeRO and offload (parallel/zero.py maps the stages to MindSpore's optimizer_level)


def optimizer_shards(name: str, shape: tuple[int, ...], parallel: ParallelConfig) -> int:
    """Over how many devices MindSpore's parallel optimizer splits trainable parameter `name` (1: it does not).

    The group is the parameter's data-parallel replicas (experts: dp / ep), or ``optimizer_shard_size`` of them;
    a parameter whose per-device fp32 size is under ``optimizer_shard_threshold_kb``, or whose per-device first
    dimension the group does not divide, stays whole (MindSpore slices dimension 0 of the device's tensor)."""
    if parallel.zero_stage == 0:
        return 1
    replicas = parallel.data_parallel // (parallel.expert_parallel if ".experts." in name else 1)
    group = replicas if parallel.optimizer_shard_size == -1 else min(parallel.optimizer_shard_size, replicas)
    split = parameter_split(name, len(shape), parallel)
    first = shape[0] // split[0]
    if 4 * math.prod(shape) / math.prod(split) < parallel.optimizer_shard_threshold_kb * 1024 or first % group:
        return 1
    return group


def _add_model_state(stage: StageMemory, name: str, shape: tuple[int, ...], elements: float,
                     parallel: ParallelConfig, copy_bytes: int) -> None:
    """A trainable parameter's bytes on a device of `stage`, by ZeRO stage (n = ``optimizer_shards``):

    stage 0: 16-bit copy, fp32 weight, fp32 gradient, AdamW m and v, all whole;
    stage 1: the fp32 weight and the moments / n; the 16-bit weight is gathered whole (after the cast) and kept
             from forward to backward; the gradient (and its accumulation buffer) whole;
    stage 2: + the gradient / n (MindSpore's gradient_accumulation_shard: reduce-scattered each micro-batch);
    stage 3: + no whole 16-bit copy is kept (one layer's is gathered at a time: ``zero3_gathered_bytes``).
    With ``offload_optimizer: host`` the moments' bytes are host memory instead."""
    n = optimizer_shards(name, shape, parallel)
    stage_ = parallel.zero_stage
    terms = stage.terms
    terms["compute weights"] += (copy_bytes if stage_ < 3 or n == 1 else 0) * elements
    terms["fp32 weights"] += 4 * elements / n
    terms["gradients"] += 4 * elements / (n if stage_ >= 2 else 1)
    if parallel.offloads_optimizer:
        stage.host["optimizer states"] = stage.host.get("optimizer states", 0.0) + 8 * elements / n
    else:
        terms["optimizer states"] += 8 * elements / n


def zero3_gathered_bytes(layer_elements: float, copy_bytes: int) -> float:
    """ZeRO-3's working set: one layer's weight gathered whole in the compute dtype (fp32 when computing in fp32)
    and its whole fp32 gradient before the reduce-scatter; DeepSpeed's estimator counts the same as 4 bytes per
    element of the largest layer (16-bit parameter and gradient)."""
    return ((copy_bytes or 4) + 4) * layer_elements


def host_bytes_per_server(stages: list[StageMemory], parallel: ParallelConfig, devices_per_server: int) -> float:
    """The most host memory one server holds for its devices (ranks fill servers in order; a rank's pipeline
    stage is rank // (dp x mp), MindSpore's assignment)."""
    per_rank = [sum(stages[rank // parallel.stage_devices].host.values()) for rank in range(parallel.device_num)]
    return max(sum(per_rank[start:start + devices_per_server])
               for start in range(0, parallel.device_num, devices_per_server))


def host_load_bytes(config, parallel: ParallelConfig, stages: list[StageMemory],
                    lora: LoraConfig | None = None) -> tuple[float, float]:
    """Host RAM of one process while it loads its weights: (with per-rank loading: this rank's slices in fp32,
    the largest slice once more while it is converted from the source's dtype, one read window (QLoRA: the whole
    base, its linear weights quantized, the largest of them once in fp32 while it is quantized); loading every full
    tensor first, as the job did before: the whole model in fp32, and for stacked experts all experts of one
    projection buffered and then stacked)."""
    from mindspore_llm.checkpoint import WINDOW_BYTES

    shapes = parameter_shapes(config) + (lora_parameter_shapes(config, lora) if lora else [])
    quantization = lora.quantization if lora is not None else None
    if quantization is not None:
        # QLoRA: every process reads the whole base, each linear weight quantized as it streams in (one in fp32)
        quantized = dict(quantized_weight_shapes(config))
        held = sum(4 * math.prod(shape) for name, shape in shapes if name not in quantized)
        held += sum(_quantized_device_bytes(name, shape, quantization, ParallelConfig())
                    for name, shape in quantized.items())
        after = held + 4 * max(math.prod(shape) for shape in quantized.values()) + WINDOW_BYTES
    else:
        largest_slice = max(_device_elements(name, shape, parallel) for name, shape in shapes)
        after = 4 * max(stage.parameters for stage in stages) + 4 * largest_slice + WINDOW_BYTES
    total, _ = count_parameters(config)
    stacked = max((math.prod(shape) for name, shape in shapes if ".experts." in name), default=0)
    return after, 4 * total + 2 * 4 * stacked


def _add_teacher(stages: list[StageMemory], distill: DistillConfig, teacher, parallel: ParallelConfig,
                 work: Workload, copy_bytes: int) -> None:
    """Online: a frozen teacher split over the same tensor-parallel x pipeline mesh (fp32 parameters as
    ``distill.load_teacher`` builds them by default, plus the compute copy), forward-only activations of one
    layer, and its fp32 logits kept for the loss on the last stage. Offline: the stored top-k values and indices."""
    last = stages[-1]
    flights = in_flight_micro_batches(parallel, last.stage)
    for stage in stages:
        stage.terms["teacher"] = 0.0
    if teacher is None:
        last.terms["teacher"] = flights * work.seq_length * work.micro_batch_size * distill.top_k * 8
        return
    mesh = ParallelConfig(model_parallel=parallel.model_parallel, pipeline_stages=parallel.pipeline_stages,
                          micro_batch_num=parallel.micro_batch_num, vocab_parallel=parallel.vocab_parallel)
    layer_stages = mesh.stage_of_layers(teacher.num_hidden_layers)
    for name, shape in parameter_shapes(teacher):
        for k in parameter_stages(name, layer_stages, teacher.tie_word_embeddings):
            stages[k].terms["teacher"] += (4 + copy_bytes) * _device_elements(name, shape, mesh)
    for stage in stages:
        stage.terms["teacher"] += max(layer_activation_bytes(teacher, i, work, mesh, "none")
                                      for i, s in enumerate(layer_stages) if s == stage.stage)
    last.terms["teacher"] += flights * logits_bytes(teacher, work, mesh)


def kv_cache_bytes(config, layers: list[int], rows: int, slots: int, parallel: ParallelConfig,
                   element_bytes: int) -> float:
    """The generation cache of `layers` for `rows` x `slots` on one device: per layer and slot, GQA keys and
    values (2 x num_key_value_heads x head_dim, heads split over tensor parallelism), or MLA's latent
    (kv_lora_rank + qk_rope_head_dim, replicated)."""
    if hasattr(config, "kv_lora_rank"):
        per_slot = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_slot = 2 * config.num_key_value_heads * config.head_dim / parallel.model_parallel
    return element_bytes * rows * slots * per_slot * len(layers)


def _add_grpo(stages: list[StageMemory], config, grpo: GRPOConfig, rollouts: int, parallel: ParallelConfig,
              work: Workload, lora: LoraConfig | None, copy_bytes: int) -> None:
    """GRPO beside the policy's training state: the reference policy (a frozen copy of the model split like it,
    fp32 + compute copy; nothing with LoRA, whose reference is the base with the adapters off), the step's
    rollout buffers (token ids, masks, positions; old and reference log-probabilities, aggregation weights), and
    what generation holds instead of the training step's activations: the KV cache of one generation batch, one
    layer's prefill working set and the sampler's (rows, vocab) fp32 buffers."""
    rows = grpo.generation_batch_size or rollouts
    prompt, new = grpo.max_prompt_length, grpo.max_new_tokens
    prefill = Workload(prompt, rows, work.compute_bytes, work.activation_bytes)
    layer_stages = parallel.stage_of_layers(config.num_hidden_layers)
    for stage in stages:
        stage.terms["reference model"] = 0.0
        if grpo.beta > 0 and lora is None:
            for name, shape in parameter_shapes(config):
                if stage.stage in parameter_stages(name, layer_stages, config.tie_word_embeddings):
                    stage.terms["reference model"] += (4 + copy_bytes) * _device_elements(name, shape, parallel)
        stage.terms["rollout buffers"] = rollouts * (3 * 4 * (prompt + new) + 3 * 4 * new)
        stage.rollout["kv cache (rollout)"] = kv_cache_bytes(config, stage.layers, rows, prompt + new - 1,
                                                             parallel, work.stored_bytes)
        stage.rollout["prefill working set"] = max(layer_activation_bytes(config, i, prefill, parallel, "none")
                                                   for i in stage.layers)
        stage.rollout["sampler"] = 3 * 4 * rows * config.vocab_size


# ----------------------------------------------------------------------------------------------------------------
# What the planner is given (a training YAML is read into this by mindspore_llm.train.config.load_plan_inputs)


@dataclass
class PlanInputs:
    source: str
    model: Any  # the family config
    parallel: ParallelConfig
    work: Workload
    global_batch_size: int | None
    micro_batch_size: int
    gradient_accumulation_steps: int
    lora: LoraConfig | None = None
    distill: DistillConfig | None = None
    teacher: Any = None  # the online teacher's family config
    kernels: Kernels = Kernels()  # the job's device target's (the op strategies depend on them)
    grpo: GRPOConfig | None = None

    @property
    def rollouts(self) -> int:
        """GRPO rollouts per data-parallel replica and step (its micro-batches x accumulation)."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.parallel.micro_batch_num


# ----------------------------------------------------------------------------------------------------------------
# The printed plan


def _representative_model(config, kernels: Kernels):
    """The same family at tiny dimensions (one dense and, for MoE, one MoE layer) with the job's kernels (built in
    bf16 compute, never run): op strategies depend on the cell types and kernels only, so its strategies are the
    real model's."""
    import dataclasses

    import mindspore as ms

    from mindspore_llm.models.auto import build_model
    from mindspore_llm.models.layers import Precision

    # every linear layer's in_features a multiple of 64, so that a quantized base can be shown too
    small = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4,
             "moe_intermediate_size": 64, "kv_lora_rank": 64, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
             "v_head_dim": 16, "head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
             "topk_group": 1}
    if getattr(config, "num_key_value_heads", None) is not None and not hasattr(config, "kv_lora_rank"):
        small["num_key_value_heads"] = 4 if config.num_key_value_heads == config.num_attention_heads else 2
    if getattr(config, "q_lora_rank", None):
        small["q_lora_rank"] = 64
    dense = min(getattr(config, "first_k_dense_replace", 0), 1)
    small["num_hidden_layers"] = dense + (1 if is_moe(config) else 0) or 1
    if is_moe(config):
        small["first_k_dense_replace"] = dense
    fields = {f.name for f in dataclasses.fields(config)}
    return build_model(dataclasses.replace(config, **{k: v for k, v in small.items() if k in fields}),
                       Precision(ms.float32, ms.bfloat16, kernels=kernels))


def representative_strategies(config, parallel: ParallelConfig, lora: LoraConfig | None = None,
                              kernels: Kernels = Kernels()):
    """Op strategies of one layer of each kind (and the ops outside the layers), checked against the mesh."""
    from mindspore_llm.lora import apply_lora
    from mindspore_llm.parallel.plan import apply_plan, check_strategies

    model = _representative_model(config, kernels)
    if lora is not None:
        apply_lora(model, lora)
    one_stage = ParallelConfig(**{**vars(parallel), "pipeline_stages": 1, "stage_layers": None,
                                  "micro_batch_num": 1, "recompute": "none"})
    applied = apply_plan(model, one_stage)
    check_strategies(applied, parallel)
    return applied


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _fmt(strategy) -> str:
    return str(strategy).replace(" ", "")


def _moe_line(config, seq_length: int) -> str:
    from mindspore_llm.flops import executed_flops_per_token, flops_per_token

    dispatch = f"{config.moe_dispatch} dispatch"
    if config.moe_dispatch == "capacity":
        capacity = expert_capacity(seq_length, config.n_routed_experts, config.num_experts_per_tok,
                                   config.moe_capacity_factor)
        dispatch += (f" (factor {config.moe_capacity_factor:g}: {capacity} of {seq_length} tokens per expert and "
                     f"sequence, drop by {config.moe_drop_policy})")
    return (f"moe: {dispatch}, {routed_slots_per_token(config, seq_length):.2f} routed-expert rows per token "
            f"(top-{config.num_experts_per_tok} of {config.n_routed_experts}); training FLOPs per token "
            f"{executed_flops_per_token(config, seq_length) / 1e12:.3f} T executed, "
            f"{flops_per_token(config, seq_length) / 1e12:.3f} T model (MFU counts these)")


# Host <-> device bandwidth per 910B and direction assumed for offload timing (not measured here): the Atlas 800T A2
# links each NPU to the host over PCIe x16 (32-64 GB/s theoretical per direction by generation); 25 GB/s is a
# sustained planning figure. ``msllm plan --pcie-gb-per-s`` sets another.
PCIE_GB_PER_S = 25.0
DEVICES_PER_SERVER = 8


@dataclass(frozen=True)
class Offload:
    """How the offload figures are worked out: host<->device bandwidth per device (GB/s, 10^9 bytes) and the
    devices of one server."""
    pcie_gb_per_s: float = PCIE_GB_PER_S
    devices_per_server: int = DEVICES_PER_SERVER


def micro_batches_per_step(inputs: PlanInputs) -> int:
    return inputs.parallel.micro_batch_num * inputs.gradient_accumulation_steps


def zero_lines(inputs: PlanInputs, stages: list[StageMemory], offload: Offload) -> list[str]:
    """The ZeRO stage, host memory per server and PCIe traffic per step of the plan."""
    from mindspore_llm.parallel.zero import describe

    parallel = inputs.parallel
    lines = [f"zero: {describe(parallel)}"]
    host = host_bytes_per_server(stages, parallel, min(offload.devices_per_server, parallel.device_num))
    if host:
        worst = max(stages, key=lambda s: s.pcie_bytes(micro_batches_per_step(inputs)))
        traffic = worst.pcie_bytes(micro_batches_per_step(inputs))
        lines.append(f"  host memory: {host / GB:.2f} GB per server of {offload.devices_per_server} devices ("
                     + ", ".join(f"{term} {b / GB:.2f} GB" for term, b in worst.host.items())
                     + f" per device of stage {worst.stage})")
        lines.append(f"  host<->device traffic: {traffic / GB:.2f} GB per step and device, "
                     f"{traffic / 1e9 / offload.pcie_gb_per_s:.2f} s "
                     f"at an assumed {offload.pcie_gb_per_s:g} GB/s per device (not overlapped with compute; "
                     f"measure on the server)")
    return lines


def plan_report(inputs: PlanInputs, device_num: int, hbm_gb: float,
                offload: Offload = Offload()) -> tuple[str, bool]:
    """(the printed plan, whether every stage fits in `hbm_gb`)."""
    from mindspore_llm.parallel.plan import validate_plan

    config, parallel, work = inputs.model, inputs.parallel, inputs.work
    validate_plan(config, parallel, device_num, inputs.global_batch_size, inputs.micro_batch_size,
                  inputs.gradient_accumulation_steps, work.seq_length, inputs.lora and inputs.lora.quantization)
    total, active = count_parameters(config)
    global_batch = (parallel.data_parallel * inputs.micro_batch_size * parallel.micro_batch_num
                    * inputs.gradient_accumulation_steps)
    lines = [f"plan for {inputs.source}",
             f"model: {config.architecture}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"{_count(total)} parameters ({_count(active)} active per token)",
             f"device mesh: {device_num} devices = data_parallel {parallel.data_parallel} x model_parallel "
             f"{parallel.model_parallel} x pipeline_stages {parallel.pipeline_stages}"
             + (f"; experts over expert_parallel {parallel.expert_parallel} of the dp replicas"
                if is_moe(config) else ""),
             f"  zero_stage {parallel.zero_stage}, sequence_parallel {parallel.sequence_parallel}, "
             f"vocab_parallel {parallel.vocab_parallel}, micro_batch_num {parallel.micro_batch_num}",
             f"batch: seq_length {work.seq_length}, micro_batch_size {inputs.micro_batch_size}, global batch "
             f"{global_batch}"
             f", compute {'fp32' if work.compute_bytes == 4 else '16-bit (O2)'}"]
    lines.append("kernels: " + (", ".join(f"fused {name}" for name in inputs.kernels.fused) or "all decomposed")
                 + ("; flash attention stores no S x S scores" if work.flash_attention else
                    "; the attention scores (S x S per head) are stored unless recomputed"))
    if is_moe(config):
        lines.append(_moe_line(config, work.seq_length))
    if inputs.lora:
        held = inputs.lora.quantization
        base = "base frozen" if held is None else (
            f"base frozen, its linear layers in {held.method}" + (" with double quantization" if held.double_quant
                                                                  else ""))
        lines.append(f"lora: rank {inputs.lora.rank} on {', '.join(inputs.lora.target_modules)}; {base}")
    if inputs.teacher is not None:
        lines.append(f"distill: online teacher {inputs.teacher.architecture}, "
                     f"{_count(count_parameters(inputs.teacher)[0])} parameters, frozen")
    elif inputs.distill is not None:
        lines.append(f"distill: offline teacher top-{inputs.distill.top_k} logits")
    if inputs.grpo is not None:
        grpo = inputs.grpo
        lines.append(f"grpo: {grpo.num_generations} rollouts per prompt, {inputs.rollouts} per replica and step, "
                     f"prompts <= {grpo.max_prompt_length} + {grpo.max_new_tokens} new tokens; reference: "
                     + ("the base with adapters off (no copy)" if inputs.lora else
                        "a frozen copy" if grpo.beta > 0 else "none (beta 0)"))
    stages = estimate_memory(config, parallel, work, inputs.lora, inputs.distill, inputs.teacher, inputs.grpo,
                             inputs.rollouts)
    modes = parallel.recompute_of_layers(config.num_hidden_layers)
    lines.append("pipeline stages:")
    for stage in stages:
        ids = stage.layers
        lines.append(f"  stage {stage.stage}: layers {ids[0]}-{ids[-1]} ({len(ids)}), recompute "
                     f"{'/'.join(sorted({modes[i] for i in ids}))}, {_count(stage.parameters)} parameters per device")
    lines.append("op strategies (one layer of each kind shown; every layer of that kind is the same):")
    for op in representative_strategies(config, parallel, inputs.lora, inputs.kernels):
        out = f" -> {_fmt(op.out_strategy)}" if op.out_strategy else ""
        lines.append(f"  {op.path:58s} {_fmt(op.strategy)}{out}")
    hbm = hbm_gb * GB
    lines.append(f"memory per device (GB = 2^30 bytes), HBM {hbm_gb:g} GB:")
    header = f"  {'':24s}" + "".join(f"{'stage ' + str(s.stage):>12s}" for s in stages)
    lines.append(header)
    for term in stages[0].terms:
        lines.append(f"  {term:24s}" + "".join(f"{s.terms[term] / GB:12.2f}" for s in stages))
    if stages[0].rollout:
        lines.append("  generation, in place of " + ", ".join(TRAINING_TRANSIENT) + ":")
        for term in stages[0].rollout:
            lines.append(f"  {term:24s}" + "".join(f"{s.rollout[term] / GB:12.2f}" for s in stages))
    lines.append(f"  {'total':24s}" + "".join(f"{s.total / GB:12.2f}" for s in stages))
    fits = all(s.total <= hbm for s in stages)
    worst = max(stages, key=lambda s: s.total)
    without = [sum(layer_activation_bytes(config, i, work, parallel, "none", inputs.lora) for i in s.layers)
               * in_flight_micro_batches(parallel, s.stage) for s in stages]
    lines.append("  activations without recompute would be: "
                 + ", ".join(f"stage {s.stage} {w / GB:.2f} GB" for s, w in zip(stages, without)))
    lines += zero_lines(inputs, stages, offload)
    lines.append(f"peak: stage {worst.stage}, {worst.total / GB:.2f} GB of {hbm_gb:g} GB -> "
                 f"{'fits' if fits else 'DOES NOT FIT'}; dominant term: {worst.dominant} "
                 f"({worst.term(worst.dominant) / GB:.2f} GB)")
    after, before = host_load_bytes(config, parallel, stages, inputs.lora)
    how = ("the whole base, its linear weights quantized as they stream in" if inputs.lora is not None
           and inputs.lora.quantization is not None else
           "this rank's slices in fp32, one more for the conversion, a read window")
    lines.append(f"host memory per process while loading weights: {after / GB:.2f} GB ({how}); every full tensor "
                 f"on every process would take {before / GB:.2f} GB")
    return "\n".join(lines), fits


# ----------------------------------------------------------------------------------------------------------------
# Every ZeRO stage x offload choice of one job


@dataclass(frozen=True)
class ZeroChoice:
    zero_stage: int
    offload_optimizer: str
    device_bytes: float  # the peak stage's device bytes
    model_state_bytes: float  # of which weights, gradients, optimizer state
    host_bytes_per_server: float
    pcie_seconds: float  # per step, the busiest device
    deepspeed_bytes: float | None  # DeepSpeed's estimator for the same model state (stages 2, 3)
    refused: str | None = None  # why the project refuses this choice for the job


MODEL_STATE_TERMS = ("compute weights", "fp32 weights", "gradients", "optimizer states", "gathered layer (ZeRO-3)")


def zero_choices(inputs: PlanInputs, offload: Offload = Offload()) -> list[ZeroChoice]:
    """The job under every zero_stage x offload_optimizer choice (the rest of its parallel section kept)."""
    import dataclasses

    from mindspore_llm.common import ConfigError
    from mindspore_llm.parallel.zero import deepspeed_estimate

    choices = []
    for zero_stage in (0, 1, 2, 3):
        for target in ("none", "host"):
            parallel = dataclasses.replace(inputs.parallel, zero_stage=zero_stage, optimizer_shard=False,
                                           offload_optimizer=target)
            if zero_stage == 0:
                parallel = dataclasses.replace(parallel, optimizer_shard_size=-1, optimizer_shard_threshold_kb=64)
            try:
                parallel.validate()
            except ConfigError as err:
                choices.append(ZeroChoice(zero_stage, target, 0, 0, 0, 0, None, str(err)))
                continue
            stages = estimate_memory(inputs.model, parallel, inputs.work, inputs.lora, inputs.distill, inputs.teacher)
            worst = max(stages, key=lambda s: s.total)
            state = sum(worst.terms.get(term, 0.0) for term in MODEL_STATE_TERMS)
            trainable = _trainable_elements(inputs, parallel, worst)
            estimate = deepspeed_estimate(zero_stage, trainable[0], trainable[1], parallel.data_parallel, 1,
                                          target == "host")
            micro = inputs.parallel.micro_batch_num * inputs.gradient_accumulation_steps
            choices.append(ZeroChoice(
                zero_stage, target, worst.total, state,
                host_bytes_per_server(stages, parallel, min(offload.devices_per_server, parallel.device_num)),
                max(s.pcie_bytes(micro) for s in stages) / 1e9 / offload.pcie_gb_per_s,
                None if estimate is None else estimate[1]))
    return choices


def _trainable_elements(inputs: PlanInputs, parallel: ParallelConfig, stage: StageMemory) -> tuple[float, float]:
    """(trainable elements on a device of `stage` before ZeRO, those of its largest layer): what DeepSpeed's
    estimator calls total_params and largest_layer_params for a model-parallel slice."""
    shapes = lora_parameter_shapes(inputs.model, inputs.lora) if inputs.lora else parameter_shapes(inputs.model)
    layer_stages = parallel.stage_of_layers(inputs.model.num_hidden_layers)
    total, per_layer = 0.0, {}
    for name, shape in shapes:
        if stage.stage in parameter_stages(name, layer_stages, inputs.model.tie_word_embeddings):
            elements = _device_elements(name, shape, parallel)
            total += elements
            index = layer_index(name)
            if index is not None:
                per_layer[index] = per_layer.get(index, 0.0) + elements
    return total, max(per_layer.values(), default=0.0)


def compare_zero_report(inputs: PlanInputs, hbm_gb: float, offload: Offload = Offload()) -> str:
    """One table: every stage x offload choice, device and host GB side by side, DeepSpeed's estimate beside."""
    rows = zero_choices(inputs, offload)
    lines = [f"ZeRO choices for {inputs.source} (peak pipeline stage; GB = 2^30 bytes; HBM {hbm_gb:g} GB; host "
             f"per server of {offload.devices_per_server} devices; PCIe at an assumed {offload.pcie_gb_per_s:g} "
             f"GB/s per device)",
             f"  {'zero_stage':>10s} {'offload':>8s} {'device GB':>10s} {'model state':>12s} "
             f"{'DeepSpeed est.':>15s} {'host GB':>9s} {'PCIe s/step':>12s}  verdict"]
    reasons = list(dict.fromkeys(row.refused for row in rows if row.refused))
    for row in rows:
        if row.refused:
            lines.append(f"  {row.zero_stage:>10d} {row.offload_optimizer:>8s} {'-':>10s} {'-':>12s} {'-':>15s} "
                         f"{'-':>9s} {'-':>12s}  refused ({reasons.index(row.refused) + 1})")
            continue
        deepspeed = "-" if row.deepspeed_bytes is None else f"{row.deepspeed_bytes / GB:.2f}"
        verdict = "fits" if row.device_bytes <= hbm_gb * GB else "does not fit"
        lines.append(f"  {row.zero_stage:>10d} {row.offload_optimizer:>8s} {row.device_bytes / GB:>10.2f} "
                     f"{row.model_state_bytes / GB:>12.2f} {deepspeed:>15s} {row.host_bytes_per_server / GB:>9.2f} "
                     f"{row.pcie_seconds:>12.2f}  {verdict}")
    lines += [f"  ({i}) {reason}" for i, reason in enumerate(reasons, 1)]
    lines.append("  model state: weights, gradients, optimizer state on the device. DeepSpeed est.: its "
                 "estimate_zero2/3_model_states_mem_needs for the same slice over dp; it counts 16-bit "
                 "gradients beside fp32 ones (MindSpore keeps fp32 only) and, offloaded, the fp32 weights and "
                 "gradients on the host with a CPU Adam (MindSpore updates on the device: only the moments move)")
    return "\n".join(lines)


"""ZeRO stages and host offload, DeepSpeed's names on MindSpore 2.10's machinery.

What each stage shards over a weight's data-parallel replicas (read in MindSpore's ``_auto_parallel_context.py`` and
``auto_parallel.py``; the per-device bytes are ``parallel/memory.py``'s):

  stage  MindSpore                       sharded                         whole on every device
  0      no parallel optimizer           nothing                         fp32 weight, fp32 gradient, AdamW m and v
  1      hsdp(optimizer_level="level1")  fp32 weight (the master copy),  the 16-bit weight (all-gathered after the
                                         AdamW m and v                   cast, kept from forward to backward), the
                                                                         gradient (accumulation buffers too)
  2      level2                          + gradients: MindSpore turns    the 16-bit weight
                                         on gradient_accumulation_shard
                                         (buffers reduce-scattered each
                                         micro-batch)
  3      level3                          + the gathered 16-bit weight is one layer's gathered weight at a time
                                         freed after forward and
                                         gathered again for backward
                                         (MindSpore's zero3 flag)

DeepSpeed's stage 1 partitions its fp32 master copy too (it counts as optimizer state); the difference is that here
the fp32 master weight *is* the parameter, so MindSpore slices the parameter itself and gathers it for the forward
pass. MindSpore's gradients of fp32 parameters are fp32: there is no 16-bit gradient copy as in DeepSpeed.

Host offload (``offload_optimizer: host``): every AdamW moment is created with ``Parameter.clone`` (its weight's
layout, and its optimizer shard) and placed in host memory (``Parameter(..., device="CPU")``: loaded to the device
when the optimizer uses it, unloaded after), which needs the runtime option ``MS_DEV_RUNTIME_CONF=switch_inline:False``
(set only then). Unlike DeepSpeed's ZeRO-Offload the update runs on the device: the fp32 master weight and the
gradient stay there, and the moments cross PCIe twice per step. MindSpore 2.10 has no NVMe offload.

``deepspeed_overrides`` reads the ``zero_optimization`` block of a DeepSpeed JSON into these keys;
``deepspeed_estimate`` is DeepSpeed's own model-state estimator (``estimate_zero2/3_model_states_mem_needs``), the
convention ``msllm plan --compare-zero`` sets beside the planner's numbers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mindspore_llm.common import ConfigError
from mindspore_llm.parallel.config import ParallelConfig

OPTIMIZER_LEVEL = {1: "level1", 2: "level2", 3: "level3"}
RUNTIME_CONF = "MS_DEV_RUNTIME_CONF"
# host-placed parameters are swapped in and out by the runtime, which MindSpore's inlined control flow (switch
# inlining) does not support: mindformers' AdamW(swap=True) runs with this option
HOST_PLACEMENT_RUNTIME_OPTION = ("switch_inline", "False")


def hsdp_arguments(parallel: ParallelConfig) -> dict | None:
    """``AutoParallel.hsdp``'s keyword arguments for the job's stage, or None at stage 0."""
    if parallel.zero_stage == 0:
        return None
    return {"shard_size": parallel.optimizer_shard_size, "threshold": parallel.optimizer_shard_threshold_kb,
            "optimizer_level": OPTIMIZER_LEVEL[parallel.zero_stage]}


def comm_fusion_config(parallel: ParallelConfig) -> dict | None:
    """``AutoParallel.comm_fusion``'s config: each collective fused into buckets of the given size."""
    if not parallel.comm_fusion_mb:
        return None
    return {"openstate": True, **{kind: {"mode": "size", "config": mb} for kind, mb in parallel.comm_fusion_mb.items()}}


def configure_parallel_optimizer(net, parallel: ParallelConfig) -> None:
    """The stage, shard size, threshold and communication fusion on an ``AutoParallel`` cell."""
    arguments = hsdp_arguments(parallel)
    if arguments is not None:
        net.hsdp(**arguments)
    fusion = comm_fusion_config(parallel)
    if fusion is not None:
        net.comm_fusion(fusion)


def runtime_conf_for_host_placement(current: str | None) -> str:
    """``MS_DEV_RUNTIME_CONF`` with ``switch_inline:False`` added to (or replacing it in) the user's own options."""
    key, value = HOST_PLACEMENT_RUNTIME_OPTION
    options = [item for item in (current or "").split(",") if item.strip() and item.split(":")[0].strip() != key]
    return ",".join(options + [f"{key}:{value}"])


def set_runtime_for(parallel: ParallelConfig) -> str | None:
    """Set the runtime option host placement needs, only when the job offloads; return what was set. MindSpore
    reads the variable when it first compiles, so this must run before the step is compiled."""
    if not parallel.offloads_optimizer:
        return None
    os.environ[RUNTIME_CONF] = runtime_conf_for_host_placement(os.environ.get(RUNTIME_CONF))
    return os.environ[RUNTIME_CONF]


def describe(parallel: ParallelConfig) -> str:
    """One line: the stage and what MindSpore is told."""
    arguments = hsdp_arguments(parallel)
    text = (f"zero_stage {parallel.zero_stage}"
            + (f" (hsdp {arguments['optimizer_level']}, shard size {arguments['shard_size']}, threshold "
               f"{arguments['threshold']} KB)" if arguments else " (no parallel optimizer)"))
    if parallel.offloads_optimizer:
        text += f", AdamW moments in host memory ({RUNTIME_CONF}={':'.join(HOST_PLACEMENT_RUNTIME_OPTION)})"
    return text


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed's JSON


@dataclass
class DeepSpeedMapping:
    overrides: list[str]  # --set style: "parallel.zero_stage=2"
    mapped: list[str]  # "zero_optimization.stage 2 -> parallel.zero_stage 2"
    ignored: list[str]  # "zero_optimization.overlap_comm: why"

    def report(self, source: str) -> str:
        lines = [f"DeepSpeed config {source}:"]
        lines += [f"  mapped:  {line}" for line in self.mapped] or ["  mapped:  nothing"]
        lines += [f"  ignored: {line}" for line in self.ignored]
        return "\n".join(lines)


# DeepSpeed keys that have no MindSpore 2.10 counterpart, and why
_IGNORED = {
    "overlap_comm": "MindSpore's graph compiler schedules and overlaps the collectives itself",
    "contiguous_gradients": "MindSpore's memory planner places the gradients (no user-level contiguous buffer)",
    "round_robin_gradients": "no MindSpore counterpart (gradient partitions follow the weights' shards)",
    "sub_group_size": "the update runs in one compiled graph, not in CPU-side sub-groups",
    "load_from_fp32_weights": "the fp32 master weights are the parameters, always saved and loaded",
    "elastic_checkpoint": "checkpoints are per-rank slices merged with `msllm-ckpt merge-slices`",
    "stage3_prefetch_bucket_size": "MindSpore's level3 gathers each weight before its backward; no prefetch size",
    "stage3_max_live_parameters": "no MindSpore counterpart (level3 frees each gathered weight after use)",
    "stage3_max_reuse_distance": "no MindSpore counterpart",
    "stage3_gather_16bit_weights_on_model_save": "the final model is always written whole (safetensors)",
    "stage3_gather_fp16_weights_on_model_save": "the final model is always written whole (safetensors)",
    "zero_hpz_partition_size": "no hierarchical partitioning in MindSpore's parallel optimizer",
    "zero_quantized_weights": "no quantized communication in MindSpore's parallel optimizer",
    "zero_quantized_gradients": "no quantized communication in MindSpore's parallel optimizer",
    "ignore_unused_parameters": "every trainable parameter of the graph gets a gradient",
    "memory_efficient_linear": "no MindSpore counterpart",
}
_ELEMENT_BYTES = 4  # DeepSpeed counts bucket sizes and the persistence threshold in elements; ours are fp32


def _megabytes(elements) -> int:
    return max(1, round(float(elements) * _ELEMENT_BYTES / 2 ** 20))


def deepspeed_overrides(path: str | os.PathLike) -> DeepSpeedMapping:
    """The training-YAML overrides the ``zero_optimization`` block of DeepSpeed JSON `path` stands for, with what
    was mapped and what ignored (and why). Only ZeRO is read: batch sizes, precision and the optimizer of a
    DeepSpeed JSON belong to the YAML's train/precision/optimizer sections, and are listed as ignored."""
    try:
        document = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"--deepspeed {path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({err})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"--deepspeed {path}: expected a JSON object")
    zero = document.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"--deepspeed {path}: zero_optimization must be an object")
    mapping = DeepSpeedMapping([], [], [])
    where = f"{path}: zero_optimization"

    def set_key(key: str, value, source: str) -> None:
        mapping.overrides.append(f"parallel.{key}={value}")
        mapping.mapped.append(f"{source} -> parallel.{key}: {value}")

    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}.stage: {stage!r}; DeepSpeed and MindSpore have stages 0-3")
    set_key("zero_stage", stage, f"stage {stage}")
    for name, offload in (("offload_optimizer", zero.get("offload_optimizer")), ("offload_param",
                                                                                  zero.get("offload_param"))):
        if not offload:
            continue
        device = offload.get("device", "none") if isinstance(offload, dict) else offload
        if device == "nvme":
            raise ConfigError(f"{where}.{name}.device: 'nvme' is not available: MindSpore 2.10 has no NVMe or disk "
                              f"offload; use 'cpu' (host memory)")
        if device not in ("cpu", "none"):
            raise ConfigError(f"{where}.{name}.device: {device!r}; expected 'cpu', 'nvme' or 'none'")
        if name == "offload_optimizer":
            set_key("offload_optimizer", "host" if device == "cpu" else "none", f"{name}.device {device}")
            for extra in sorted(set(offload) - {"device"}):
                mapping.ignored.append(f"{name}.{extra}: MindSpore's runtime moves host-placed parameters itself "
                                       f"(no pinning, ratio or buffer count to set)")
        elif device == "cpu":
            mapping.ignored.append(f"{name}.device cpu: the weights stay on the device (here the fp32 master "
                                   f"weights are the parameters the forward pass reads); only the optimizer state "
                                   f"is offloaded: check the fit with `msllm plan --compare-zero`")
    if "stage3_param_persistence_threshold" in zero:
        elements = zero["stage3_param_persistence_threshold"]
        set_key("optimizer_shard_threshold_kb", max(0, round(float(elements) * _ELEMENT_BYTES / 1024)),
                f"stage3_param_persistence_threshold {elements} elements x 4 bytes")
    fusion = {}
    buckets = {"reduce_bucket_size": "reducescatter" if stage >= 2 else "allreduce",
               "allgather_bucket_size": "allgather"}
    for key, kind in buckets.items():
        if key in zero:
            fusion[kind] = _megabytes(zero[key])
            mapping.mapped.append(f"{key} {zero[key]} elements x 4 bytes -> comm fusion {kind} "
                                  f"{fusion[kind]} MB")
    for key in ("reduce_scatter", "allgather_partitions"):
        if key in zero:
            mapping.ignored.append(f"{key}: MindSpore chooses reduce-scatter / all-gather from the stage")
    if fusion:
        mapping.overrides.append(f"parallel.comm_fusion_mb={json.dumps(fusion)}")
    known = {"stage", "offload_optimizer", "offload_param", "stage3_param_persistence_threshold",
             "reduce_bucket_size", "allgather_bucket_size", "reduce_scatter", "allgather_partitions"}
    for key in sorted(set(zero) - known):
        mapping.ignored.append(f"{key}: {_IGNORED.get(key, 'no MindSpore 2.10 counterpart')}")
    for key in sorted(set(document) - {"zero_optimization"}):
        mapping.ignored.append(f"{key} (outside zero_optimization): set in the training YAML (train, precision, "
                               f"optimizer, schedule)")
    return mapping


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed's estimator


def deepspeed_estimate(stage: int, total_params: float, largest_layer_params: float, num_gpus_per_node: int,
                       num_nodes: int, cpu_offload: bool, additional_buffer_factor: float = 1.5
                       ) -> tuple[float, float] | None:
    """(host bytes per node, device bytes) of DeepSpeed 0.19's ``estimate_zero2_model_states_mem_needs`` (stage 2)
    and ``estimate_zero3_model_states_mem_needs`` (stage 3, parameters not offloaded, zero_init); None for stages
    0 and 1, which DeepSpeed has no estimator for. Device: 16-bit parameters 2 bytes whole (stage 3: 4 bytes of the
    largest layer, gathered parameter and gradient) plus 18 bytes / devices (16-bit and fp32 gradient, fp32
    parameter, momentum, variance); offloaded, the fp32 state and the gradients live on the host."""
    gpus = num_gpus_per_node * num_nodes
    if stage == 2:
        if cpu_offload:
            return total_params * max(4 * gpus, 16) * additional_buffer_factor, 2 * total_params
        return (total_params * 4 * num_gpus_per_node * additional_buffer_factor,
                2 * total_params + int(18 * total_params / gpus))
    if stage == 3:
        largest = 4 * largest_layer_params
        if cpu_offload:
            return (total_params * 16 / num_nodes * additional_buffer_factor,
                    largest + int(2 * total_params / gpus))
        return largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor, largest + int(
            18 * total_params / gpus)
    return None

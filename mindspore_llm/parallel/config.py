"""How a job is split over devices. The plan (``plan.py``) turns this into every op's shard strategy and checks it
against the model (``plan.validate_plan``); ``validate()`` here only checks that the fields agree with each other.

Device layout (as mindformers and Megatron): devices = data_parallel x model_parallel x pipeline_stages.
Expert parallelism does not add devices: the routed experts are split over ``expert_parallel`` of the data-parallel
replicas (so it must divide ``data_parallel``), each expert's FFN further split by ``model_parallel``.

ZeRO (``zero_stage``, ``offload_optimizer``): what each stage shards and how it maps to MindSpore's parallel optimizer
is ``parallel/zero.py``'s; here the fields are checked against each other, refusing first (and more clearly) what
MindSpore's own validator refuses or cannot honour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import require

# "swap": the layer's activations go to host memory in forward and come back in backward (``Cell.offload``)
Recompute = Literal["none", "full", "selective", "swap"]
RECOMPUTE_MODES = ("none", "full", "selective", "swap")
ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_TARGETS = ("none", "host")
COMM_FUSION_KINDS = ("allreduce", "allgather", "reducescatter")


@dataclass(kw_only=True)
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1  # tensor parallel: heads, FFN columns and (with vocab_parallel) the vocabulary
    expert_parallel: int = 1  # routed experts split over this many data-parallel replicas
    pipeline_stages: int = 1
    # Layers per stage for an uneven split (e.g. [30, 34]); None: num_hidden_layers / pipeline_stages each.
    stage_layers: list[int] | None = None
    micro_batch_num: int = 1  # pipeline micro-batches per step (must be 1 without pipeline stages)
    # ZeRO over the data-parallel replicas: 0 off; 1 fp32 master weights and AdamW moments; 2 + gradients;
    # 3 + the gathered 16-bit weights freed after use (MindSpore's optimizer_level level1/2/3; parallel/zero.py)
    zero_stage: int = 0
    optimizer_shard: bool = False  # the older switch: true is zero_stage 1 (kept equal to zero_stage >= 1)
    optimizer_shard_size: int = -1  # devices one weight's shards spread over; -1: all its data-parallel replicas
    optimizer_shard_threshold_kb: int = 64  # parameters smaller than this (KB, per device) are not sharded
    offload_optimizer: str = "none"  # none | host: the AdamW moments live in host memory (Parameter device="CPU")
    # communication fusion bucket per collective, MB ({allreduce: 64, allgather: 64, reducescatter: 64}); None:
    # MindSpore's default
    comm_fusion_mb: dict[str, int] | None = None
    sequence_parallel: bool = False  # norms/residuals split along the sequence by model_parallel
    vocab_parallel: bool = True
    # One mode for every layer, one per pipeline stage, or one per layer.
    # "selective" recomputes the core attention (scores, softmax) only (Korthikanti et al. 2022).
    recompute: Recompute | list[Recompute] = "none"

    def __post_init__(self):
        if self.optimizer_shard and self.zero_stage == 0:
            self.zero_stage = 1
        self.optimizer_shard = self.zero_stage in (1, 2, 3)

    def validate(self) -> None:
        for name in ("data_parallel", "model_parallel", "expert_parallel", "pipeline_stages", "micro_batch_num"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        require(self.data_parallel % self.expert_parallel == 0,
                f"expert_parallel ({self.expert_parallel}) must divide data_parallel ({self.data_parallel}): "
                f"experts are split over data-parallel replicas")
        if self.stage_layers is not None:
            require(len(self.stage_layers) == self.pipeline_stages,
                    f"stage_layers has {len(self.stage_layers)} entries, pipeline_stages is {self.pipeline_stages}")
            require(all(n >= 1 for n in self.stage_layers),
                    f"stage_layers entries must be >= 1, got {self.stage_layers}")
        if self.pipeline_stages > 1:
            require(self.micro_batch_num >= self.pipeline_stages,
                    f"micro_batch_num ({self.micro_batch_num}) must be >= pipeline_stages ({self.pipeline_stages}) "
                    f"or the pipeline never fills")
        if isinstance(self.recompute, list):
            require(len(self.recompute) > 0, "recompute list is empty")
        self._validate_zero()

    def _validate_zero(self) -> None:
        """What MindSpore 2.10 refuses (``AutoParallel.hsdp``, ``set_parallel_optimizer_config``, ``comm_fusion``,
        ``Parameter(device=...)``) or cannot honour, refused here with the key and the reason."""
        require(self.zero_stage in ZERO_STAGES,
                f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r} (MindSpore's optimizer_level has level1, "
                f"level2 and level3 only)")
        if self.offload_optimizer == "nvme":
            raise ConfigError("offload_optimizer: 'nvme' is not available: MindSpore 2.10 has no NVMe or disk "
                              "offload (Parameter device is 'CPU' or 'Remote' only); use 'host' (host memory)")
        require(self.offload_optimizer in OFFLOAD_TARGETS,
                f"offload_optimizer must be 'none' or 'host', got {self.offload_optimizer!r}")
        if self.zero_stage >= 2:
            require(self.data_parallel > 1,
                    f"zero_stage {self.zero_stage} shards gradients (and weights) over the data-parallel replicas, "
                    f"but data_parallel is 1: there is nothing to shard across (use zero_stage 0 or 1, or "
                    f"offload_optimizer: host)")
        if self.zero_stage == 0:
            require(self.optimizer_shard_size == -1 and self.optimizer_shard_threshold_kb == 64,
                    "optimizer_shard_size / optimizer_shard_threshold_kb: only read by the parallel optimizer; "
                    "set zero_stage >= 1 or leave them at their defaults (-1, 64)")
        size = self.optimizer_shard_size
        require(size == -1 or (isinstance(size, int) and size >= 2 and self.data_parallel % size == 0),
                f"optimizer_shard_size must be -1 (all data-parallel replicas) or a divisor >= 2 of data_parallel "
                f"({self.data_parallel}), got {size!r} (MindSpore ignores a size <= 1 and groups shards among the "
                f"replicas of a weight)")
        require(self.optimizer_shard_threshold_kb >= 0,
                f"optimizer_shard_threshold_kb must be >= 0, got {self.optimizer_shard_threshold_kb}")
        if self.comm_fusion_mb is not None:
            unknown = sorted(set(self.comm_fusion_mb) - set(COMM_FUSION_KINDS))
            require(not unknown, f"comm_fusion_mb: unknown collective(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(COMM_FUSION_KINDS)}")
            for kind, mb in self.comm_fusion_mb.items():
                require(isinstance(mb, int) and not isinstance(mb, bool) and mb >= 0,
                        f"comm_fusion_mb.{kind} must be an integer number of MB >= 0, got {mb!r}")

    @property
    def offloads_optimizer(self) -> bool:
        return self.offload_optimizer == "host"

    @property
    def stage_devices(self) -> int:
        return self.data_parallel * self.model_parallel

    @property
    def device_num(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stages

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Layer count of each stage; an even split unless ``stage_layers`` says otherwise."""
        if self.stage_layers is not None:
            return list(self.stage_layers)
        return [num_layers // self.pipeline_stages] * self.pipeline_stages

    def stage_of_layers(self, num_layers: int) -> list[int]:
        """The pipeline stage of each layer."""
        return [stage for stage, n in enumerate(self.layers_per_stage(num_layers)) for _ in range(n)]

    def recompute_of_layers(self, num_layers: int) -> list[str]:
        """The recompute mode of each layer (a per-stage list is expanded over the stage's layers)."""
        if isinstance(self.recompute, str):
            return [self.recompute] * num_layers
        if len(self.recompute) == num_layers:
            return list(self.recompute)
        return [self.recompute[stage] for stage in self.stage_of_layers(num_layers)]

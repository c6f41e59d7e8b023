"""How a job is split over devices. The plan (``plan.py``) turns this into every op's shard strategy and checks it
against the model (``plan.validate_plan``); ``validate()`` here only checks that the fields agree with each other.

Device layout (as mindformers and Megatron): devices = data_parallel x model_parallel x pipeline_stages.
Expert parallelism does not add devices: the routed experts are split over ``expert_parallel`` of the data-parallel
replicas (so it must divide ``data_parallel``), each expert's FFN further split by ``model_parallel``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mindspore_llm.config_utils import require

Recompute = Literal["none", "full", "selective"]
RECOMPUTE_MODES = ("none", "full", "selective")


@dataclass(kw_only=True)
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1  # tensor parallel: heads, FFN columns and (with vocab_parallel) the vocabulary
    expert_parallel: int = 1  # routed experts split over this many data-parallel replicas
    pipeline_stages: int = 1
    # Layers per stage for an uneven split (e.g. [30, 34]); None: num_hidden_layers / pipeline_stages each.
    stage_layers: list[int] | None = None
    micro_batch_num: int = 1  # pipeline micro-batches per step (must be 1 without pipeline stages)
    optimizer_shard: bool = False  # parallel optimizer: master weights, gradients, AdamW states split over dp
    sequence_parallel: bool = False  # norms/residuals split along the sequence by model_parallel
    vocab_parallel: bool = True
    # One mode for every layer, one per pipeline stage, or one per layer.
    # "selective" recomputes the core attention (scores, softmax) only (Korthikanti et al. 2022).
    recompute: Recompute | list[Recompute] = "none"

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

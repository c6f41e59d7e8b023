"""How a job is split over devices. The plan (``plan.py``) turns this into every op's shard strategy."""
from __future__ import annotations

from dataclasses import dataclass

from mindspore_llm.config_utils import require


@dataclass(kw_only=True)
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1  # tensor parallel: heads, FFN columns and (with vocab_parallel) the vocabulary
    vocab_parallel: bool = True

    def validate(self) -> None:
        for name in ("data_parallel", "model_parallel"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")

    @property
    def device_num(self) -> int:
        return self.data_parallel * self.model_parallel

"""What a user watches while training runs: a jsonl line per logged step, TensorBoard scalars, a progress bar,
curve PNGs at the end (the loss; GRPO adds the reward), and a warning when the fp16 loss scale keeps collapsing.

Only the main rank writes; the values it logs are already averaged over the data-parallel ranks.
"""
from __future__ import annotations

import json
import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from mindspore_llm.fileio import atomic_path

log = logging.getLogger("mindspore_llm")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class Throughput:
    """Tokens per second for the job and per device, and model TFLOPS / MFU when the model's FLOPs per token
    (6 N + 12 L h s, see the model family) and the device peak are known."""

    tokens_per_step: int
    world_size: int
    flops_per_token: float | None = None
    peak_tflops_per_device: float | None = None

    def __call__(self, seconds: float) -> dict[str, float]:
        tokens_per_s = self.tokens_per_step / seconds
        out = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / self.world_size}
        if self.flops_per_token:
            tflops = self.flops_per_token * out["tokens_per_s_per_device"] / 1e12
            out["model_tflops_per_device"] = tflops
            if self.peak_tflops_per_device:
                out["mfu"] = tflops / self.peak_tflops_per_device
        return out


class LossScaleWatch:
    """Warns once when a dynamic fp16 loss scale overflows in most recent steps or sinks to 1: the known NPU
    failure where training stalls (every step skipped). bf16 has fp32's exponent range and needs no scaling."""

    def __init__(self, window: int = 20, overflow_fraction: float = 0.5):
        self.recent = deque(maxlen=window)
        self.overflow_fraction = overflow_fraction
        self.warned = False

    def update(self, overflow: bool, loss_scale: float) -> str | None:
        self.recent.append(bool(overflow))
        if self.warned:
            return None
        full = len(self.recent) == self.recent.maxlen
        overflows = sum(self.recent)
        if (full and overflows >= self.overflow_fraction * len(self.recent)) or (overflow and loss_scale <= 1.0):
            self.warned = True
            return (f"the fp16 loss scale keeps collapsing ({overflows} overflow-skipped steps of the last "
                    f"{len(self.recent)}, scale now {loss_scale:g}): updates are being skipped. Train in bf16 "
                    f"instead (--set precision.compute_dtype=bf16 --set precision.loss_scale=none), which needs "
                    f"no loss scale; Ascend 910B computes bf16 natively")
        return None


class MetricsLogger:
    """``log(step, values)`` appends to metrics.jsonl and TensorBoard; ``close()`` draws ``<key>.png`` of each
    of `curves` (logged keys)."""

    def __init__(self, directory: str | Path, tensorboard: bool = True, plot: bool = True, resume_step: int = 0,
                 curves: tuple[str, ...] = ("loss",)):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.directory / METRICS_FILE
        self.curves = curves if plot else ()
        self._drop_lines_after(resume_step)
        self.jsonl = open(self.jsonl_path, "a")
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: a resumed run hides the events the interrupted run logged past its last checkpoint
            self.writer = SummaryWriter(str(self.directory / TENSORBOARD_DIR),
                                        purge_step=resume_step + 1 if resume_step else None)

    def _drop_lines_after(self, step: int) -> None:
        """On resume, the lines past the checkpoint belong to steps that are about to run again."""
        if not self.jsonl_path.exists():
            return
        kept = [line for line in self.jsonl_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_path(self.jsonl_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict) -> None:
        record = {"step": step, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", float(value), step)

    def series(self, key: str) -> list[tuple[int, float]]:
        records = [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line.strip()]
        return [(r["step"], r[key]) for r in records if key in r]

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        for key in self.curves:
            plot_curve(self.series(key), self.directory / f"{key}.png", key)


def plot_curve(points: list[tuple[int, float]], path: Path, key: str = "loss") -> None:
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, values, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training {key}")
    ax.set_title(f"{key} {values[0]:.3f} -> {values[-1]:.3f} over {steps[-1]} steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def format_step(step: int, total: int, values: dict) -> str:
    parts = [f"step {step}/{total}", f"loss {values['loss']:.4f}", f"lr {values['lr']:.3g}",
             f"grad_norm {values['grad_norm']:.3g}", f"scale {values['loss_scale']:g}",
             f"{values['tokens_per_s']:.0f} tok/s"]
    if "reward" in values:  # GRPO
        parts.insert(2, f"reward {values['reward']:.3f}")
    if values.get("overflow"):
        parts.append("OVERFLOW (update skipped)")
    return ", ".join(parts)

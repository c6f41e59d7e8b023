"""AdamW with torch.optim.AdamW's arithmetic (decoupled weight decay, bias-corrected moments, eps outside the
square root), run in the graph with its state in Parameters so that a MindSpore checkpoint holds it.

State names: ``optimizer.step`` (updates taken), ``optimizer.exp_avg.<param>`` and ``optimizer.exp_avg_sq.<param>``
(torch's names for the first and second moments). The moments are clones of their weights (``adamw_state``), which is
how MindSpore gives optimizer state its weight's layout under parallelism; with ``offload_optimizer: host`` they are
placed in host memory too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from mindspore_llm.config_utils import require
from mindspore_llm.train.schedule import LearningRate, ScheduleConfig


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad_norm: float | None = 1.0  # global L2 norm; None disables clipping

    def validate(self) -> None:
        require(self.name == "adamw", f"name must be 'adamw', got {self.name!r}")
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            require(0.0 <= value < 1.0, f"{field} must be in [0, 1), got {value}")
        require(self.eps > 0, f"eps must be positive, got {self.eps}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.clip_grad_norm is None or self.clip_grad_norm > 0,
                f"clip_grad_norm must be positive or null, got {self.clip_grad_norm}")


def param_groups(params) -> tuple[list[Parameter], list[Parameter]]:
    """(decay, no_decay): matrices decay; vectors (RMSNorm weights, biases) do not.

    The rule is by rank, not by name, so it holds for every family: embeddings and the LM head are matrices and
    decay, as in transformers' Trainer (which exempts biases and norm weights by name).
    """
    decay = [p for p in params if len(p.shape) >= 2]
    no_decay = [p for p in params if len(p.shape) < 2]
    return decay, no_decay


HOST = "CPU"  # MindSpore's name for host memory in Parameter(..., device=...)


def place_on_host(param: Parameter) -> None:
    """What ``Parameter(..., device="CPU")`` records (MindSpore 2.10's parameter.py): the runtime keeps the
    parameter in host memory, loads it to the device when an op uses it and unloads it after. The clone of a weight
    cannot be constructed with the argument, so the same record is written on it."""
    param._set_user_data("parameter_device", HOST)  # pylint: disable=protected-access


def placement(param: Parameter) -> str | None:
    """``"CPU"`` for a parameter placed in host memory, None for one on the device."""
    return param._get_user_data("parameter_device")  # pylint: disable=protected-access


def adamw_state(params: ParameterTuple, host: bool = False) -> tuple[ParameterTuple, ParameterTuple]:
    """AdamW's first and second moments of `params`: fp32 zeros named ``optimizer.exp_avg.<param>`` and
    ``optimizer.exp_avg_sq.<param>``, in host memory when `host` (ZeRO-Offload's optimizer state).

    Each moment is ``Parameter.clone`` of its weight (as MindSpore's own Adam does), which records it in the weight's
    ``param_info.cloned_obj``. Under semi-auto parallel MindSpore gives every clone its weight's layout: the weight's
    tensor-parallel slice and, with the parallel optimizer, its optimizer shard (``SetClonedTensorShapeForOptimizer``).
    A fresh Parameter would instead be a full-size replica on every device of the stage. A clone also keeps the
    weight's placement (``Parameter(..., device="CPU")``, host offload).
    """
    def moments(prefix):
        cloned = params.clone(prefix=prefix, init="zeros")
        for moment in cloned:
            moment.requires_grad = False
            if moment.dtype != ms.float32:  # the moments are fp32 whatever the weight's dtype
                moment.set_dtype(ms.float32)
            if host:
                place_on_host(moment)
        return cloned

    return moments("optimizer.exp_avg"), moments("optimizer.exp_avg_sq")


_adamw_update = ops.MultitypeFuncGraph("adamw_update")


@_adamw_update.register("Number", "Number", "Number", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Number", "Tensor", "Tensor", "Tensor", "Tensor")
def _update(beta1, beta2, eps, lr, step_size, bias_correction2_sqrt, apply, weight_decay,
            param, exp_avg, exp_avg_sq, grad):
    """One parameter's AdamW step as torch's single-tensor path orders it; nothing changes unless `apply`."""
    grad = grad.astype(ms.float32)
    new_exp_avg = exp_avg + (grad - exp_avg) * (1.0 - beta1)
    new_exp_avg_sq = exp_avg_sq * beta2 + grad * grad * (1.0 - beta2)
    decayed = param * (1.0 - lr * weight_decay)
    # divisions as products with a reciprocal: MindSpore 2.10's CPU RealDiv keeps two int64 index maps of its
    # output's size for the life of the graph, even on same-shape operands (32 bytes per parameter for these two);
    # Mul and Reciprocal keep none (docs/training_numerics.md, "Memory")
    denom = ops.sqrt(new_exp_avg_sq) * (1.0 / bias_correction2_sqrt) + eps
    new_param = decayed - step_size * (new_exp_avg * ops.reciprocal(denom))
    # a full-shape condition: Select with the scalar one cost ~3 GB more peak memory on CPU (docs/training_numerics.md)
    apply = ops.broadcast_to(apply, param.shape)
    # select, not arithmetic blending: a skipped step's gradients are inf/nan and 0 * nan is nan
    ops.assign(exp_avg, ops.select(apply, new_exp_avg, exp_avg))
    ops.assign(exp_avg_sq, ops.select(apply, new_exp_avg_sq, exp_avg_sq))
    return ops.assign(param, ops.select(apply, new_param.astype(param.dtype), param))


_fused_adamw_update = ops.MultitypeFuncGraph("fused_adamw_update")


@_fused_adamw_update.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Number",
                              "Tensor", "Tensor", "Tensor", "Tensor")
def _fused_update(kernel, rate, beta1, beta2, eps, decay_per_weight_decay, weight_decay, param, exp_avg, exp_avg_sq,
                  grad):
    """The same step as `_update` in one AdamWeightDecay kernel, which computes ``m += (g - m)(1 - beta1)``,
    ``v += (g^2 - v)(1 - beta2)``, ``w -= rate (m / (sqrt(v) + eps) + decay w)``."""
    return kernel(param, exp_avg, exp_avg_sq, rate, beta1, beta2, eps, decay_per_weight_decay * weight_decay,
                  grad.astype(ms.float32))


def fused_by_default(device_target: str | None = None) -> bool:
    """Whether AdamW runs as AdamWeightDecay kernels on `device_target` (default: the context's). CPU does: the
    decomposition's ~20 elementwise ops per weight are 40% of the step's kernel launches (docs/training_numerics.md,
    "Speed"). Ascend keeps the decomposition, the form the rehearsal compiles inside the cluster's wrappers, with
    the optimizer shard and host offload (docs/ascend_readiness.md)."""
    return (device_target or ms.get_context("device_target")) == "CPU"


class AdamW(nn.Cell):
    """``optimizer(grads, apply)`` updates every parameter when the bool scalar `apply` is true (the training step
    passes "all gradients finite") and returns the learning rate it used. The rate comes from `schedule` at the
    optimizer's own step count, counted from 1. `host_state`: the moments live in host memory. `fused`: one
    AdamWeightDecay kernel per parameter instead of the decomposition (fp32 parameters only; default
    `fused_by_default`)."""

    def __init__(self, params, config: OptimizerConfig, schedule: ScheduleConfig, host_state: bool = False,
                 fused: bool | None = None):
        super().__init__(auto_prefix=False)
        params = list(params)
        self.fused = (fused_by_default() if fused is None else fused) and all(p.dtype == ms.float32 for p in params)
        self.adam_weight_decay = ops.AdamWeightDecay()
        decay, _ = param_groups(params)
        decay_ids = {id(p) for p in decay}
        self.parameters = ParameterTuple(params)
        self.weight_decays = tuple(config.weight_decay if id(p) in decay_ids else 0.0 for p in params)
        self.exp_avg, self.exp_avg_sq = adamw_state(self.parameters, host_state)
        self.step = Parameter(Tensor(0, ms.int32), name="optimizer.step", requires_grad=False)
        self.beta1 = config.beta1
        self.beta2 = config.beta2
        self.eps = config.eps
        # 1 - beta^t as -expm1(t log beta): fp32 `1 - beta2 ** t` loses ~1e-5 relative at small t (beta2 = 0.999)
        self.log_beta1 = math.log(config.beta1) if config.beta1 > 0 else -math.inf
        self.log_beta2 = math.log(config.beta2) if config.beta2 > 0 else -math.inf
        self.learning_rate = LearningRate(schedule)
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, apply):
        step = self.step + apply.astype(ms.int32)
        ops.assign(self.step, step)
        t = step.astype(ms.float32)
        lr = self.learning_rate(t)
        bias_correction1 = -ops.expm1(t * self.log_beta1)
        bias_correction2_sqrt = ops.sqrt(-ops.expm1(t * self.log_beta2))
        step_size = lr / bias_correction1
        if self.fused:
            # a skipped step runs no kernel: selecting its gradients away (they may be inf/nan) would take a copy of
            # every gradient, 0.18 GB of peak memory at the bench's 45.6M parameters
            if apply:
                self._fused(lr, step_size, bias_correction1, bias_correction2_sqrt, grads)
            return lr
        updated = self.hyper_map(
            ops.partial(_adamw_update, self.beta1, self.beta2, self.eps, lr, step_size, bias_correction2_sqrt, apply),
            self.weight_decays, self.parameters, self.exp_avg, self.exp_avg_sq, grads)
        return ops.depend(lr, updated)

    def _fused(self, lr, step_size, bias_correction1, bias_correction2_sqrt, grads):
        # the kernel's m / (sqrt(v) + eps) is torch's m / (sqrt(v) / c2 + eps) scaled by 1 / c2, c2 the square root
        # of the second bias correction: rate and eps carry c2, and decay is weight_decay * lr / rate
        one = ops.ones_like(lr)
        return self.hyper_map(
            ops.partial(_fused_adamw_update, self.adam_weight_decay, step_size * bias_correction2_sqrt,
                        one * self.beta1, one * self.beta2, bias_correction2_sqrt * self.eps,
                        bias_correction1 / bias_correction2_sqrt),
            self.weight_decays, self.parameters, self.exp_avg, self.exp_avg_sq, grads)

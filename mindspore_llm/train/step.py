"""The compiled training step: gradient accumulation, loss scaling, all-finite check, clipping, AdamW.

One call is one optimizer update on K micro-batches:

    loss      = sum of token losses over the K micro-batches / tokens counted in all K
    gradients = d(loss)/d(weights), accumulated micro-batch by micro-batch (so equal to one step on the
                concatenated batch even when micro-batches count different numbers of tokens, like transformers'
                ``num_items_in_batch``), all-reduced by ``grad_reducer`` if given, unscaled
                (with a reducer, tokens and the reported loss are summed over the ranks first, so data parallelism
                is exact too)
    skip      = any gradient not finite (then weights, moments and the step count stay as they were)
    grad_norm = global L2 norm before clipping; clipping as torch.nn.utils.clip_grad_norm_
    update    = AdamW at the scheduled rate; then the dynamic loss scale backs off or grows

The all-finite check is the global norm itself (the sum of squares is finite exactly when every gradient is finite
and the norm fits in fp32): plain arithmetic, so it runs on CPU and Ascend alike (910B computes in INF/NAN mode),
where MindSpore's DynamicLossScaleManager and float-status ops are Ascend/GPU-only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops import operations as P

from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.config_utils import require
from mindspore_llm.models.layers import Precision
from mindspore_llm.train.optim import AdamW


@dataclass
class PrecisionConfig:
    """O0: everything fp32. O1 and O2 keep fp32 master weights (the parameters) and run matmuls in
    ``compute_dtype``; O1 keeps the activations between matmuls (residual stream, MLP and rope products) in fp32,
    O2 keeps them in ``compute_dtype`` too (less memory and bandwidth). Norms, softmax and the loss are fp32 in
    every level. ``loss_scale``: dynamic (fp16), fixed at ``initial_scale``, or none (fp32, bf16)."""
    level: Literal["O0", "O1", "O2"] = "O0"
    compute_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    loss_scale: Literal["dynamic", "fixed", "none"] = "none"
    initial_scale: float = 65536.0
    growth_interval: int = 1000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5

    def validate(self) -> None:
        require(self.level in ("O0", "O1", "O2"), f"level must be 'O0', 'O1' or 'O2', got {self.level!r}")
        require(self.level != "O0" or self.compute_dtype == "fp32",
                f"level 'O0' computes in fp32; compute_dtype {self.compute_dtype!r} needs level 'O1' or 'O2'")
        require(self.loss_scale in ("dynamic", "fixed", "none"),
                f"loss_scale must be 'dynamic', 'fixed' or 'none', got {self.loss_scale!r}")
        require(self.initial_scale >= 1, f"initial_scale must be >= 1, got {self.initial_scale}")
        require(self.growth_interval > 0, f"growth_interval must be positive, got {self.growth_interval}")
        require(self.growth_factor > 1, f"growth_factor must be > 1, got {self.growth_factor}")
        require(0 < self.backoff_factor < 1, f"backoff_factor must be in (0, 1), got {self.backoff_factor}")

    def model_precision(self) -> Precision:
        """How to build the model: parameters are always fp32 (they are the master weights)."""
        return Precision.from_names("fp32", self.compute_dtype, "fp32" if self.level == "O1" else None)


_square_sum = ops.MultitypeFuncGraph("square_sum")


@_square_sum.register("Tensor")
def _square_sum_tensor(grad):
    grad = grad.astype(ms.float32)
    return (grad * grad).sum()


_scale_grad = ops.MultitypeFuncGraph("scale_grad")


@_scale_grad.register("Tensor", "Tensor")
def _scale_grad_tensor(factor, grad):
    return grad * factor.astype(grad.dtype)


class _ScaledLossSum(nn.Cell):
    """The differentiated function: one micro-batch's token-loss sum times the multiplier (loss scale / tokens of
    all micro-batches), given as a (rows,) vector of that value so that every input is batch-major: a pipeline
    (``mindspore.parallel.nn.Pipeline``) slices each input into its micro-batches along dim 0 and sums the
    outputs, which stays the scaled token-loss sum."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, labels, attention_mask, position_ids, multiplier, teacher_values=None,
                  teacher_indices=None):
        if teacher_values is None:
            total, _ = self.model.loss_sum(input_ids, labels, attention_mask, position_ids)
        else:  # offline distillation: the stored teacher top-k of these rows
            total, _ = self.model.loss_sum(input_ids, labels, attention_mask, position_ids, teacher_values,
                                           teacher_indices)
        return total * multiplier[0]


class TrainStep(nn.Cell):
    """``step(input_ids, labels, attention_mask=None, position_ids=None, teacher_values=None, teacher_indices=None)
    -> (loss, grad_norm, overflow, loss_scale)``.

    Inputs are (K*b, S) (micro-batch k is rows k*b..(k+1)*b-1) or stacked (K, b, S); the teacher top-k of offline
    distillation (a ``DistillationModel`` without teacher) is (K*b, S, k) or (K, b, S, k). ``loss_scale`` is the scale
    the next step will use. The K micro-batches run one after another inside the one compiled graph, so the graph
    (and its compile time) grows with K. ``wrap_loss`` (``ParallelContext.wrap_loss``) wraps the differentiated
    cell, e.g. in a ``Pipeline`` that splits each of the K micro-batches further and runs them through the stages;
    then every input must be given (no None) and ``grad_reducer`` is the ``PipelineGradReducer``.

    Saved state besides the model and optimizer: ``loss_scale.scale`` and ``loss_scale.clean_steps``.
    """

    def __init__(self, model, optimizer: AdamW, precision: PrecisionConfig, accumulation_steps: int = 1,
                 clip_grad_norm: float | None = None, grad_reducer=None, wrap_loss=None):
        super().__init__(auto_prefix=False)
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.scaled_loss_sum = _ScaledLossSum(model) if wrap_loss is None else wrap_loss(_ScaledLossSum(model))
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.accumulation_steps = accumulation_steps
        self.clip_grad_norm = clip_grad_norm
        self.grad_reducer = grad_reducer
        # data parallel: normalise by the tokens of all ranks; a mean-reducer's 1/ranks is undone by `ranks`
        # (semi-auto parallel, pipeline included, feeds every rank the full batch: its counts are global already)
        data_parallel = isinstance(grad_reducer, nn.DistributedGradReducer)
        self.all_reduce = P.AllReduce() if data_parallel else None
        self.ranks = 1.0 / float(grad_reducer.degree.asnumpy()) if data_parallel and grad_reducer.mean else 1.0
        self.dynamic = precision.loss_scale == "dynamic"
        initial_scale = 1.0 if precision.loss_scale == "none" else float(precision.initial_scale)
        self.scale = Parameter(Tensor(initial_scale, ms.float32), name="loss_scale.scale", requires_grad=False)
        self.clean_steps = Parameter(Tensor(0, ms.int32), name="loss_scale.clean_steps", requires_grad=False)
        self.growth_interval = precision.growth_interval
        self.growth_factor = precision.growth_factor
        self.backoff_factor = precision.backoff_factor
        self.hyper_map = ops.HyperMap()
        self.add = ops.Add()

    def _micro_batches(self, x, row_ndim=1):
        """(K*b, *row) -> (K, b, *row); already stacked (row_ndim + 2 dimensions) or None: as it is."""
        if x is None or x.ndim == row_ndim + 2:
            return x
        if x.shape[0] % self.accumulation_steps != 0:
            raise ValueError("the batch's first dimension must be a multiple of accumulation_steps")
        return x.reshape((self.accumulation_steps, x.shape[0] // self.accumulation_steps) + x.shape[1:])

    @staticmethod
    def _pick(x, k):
        return None if x is None else x[k]

    def construct(self, input_ids, labels, attention_mask=None, position_ids=None, teacher_values=None,
                  teacher_indices=None):
        input_ids = self._micro_batches(input_ids)
        labels = self._micro_batches(labels)
        attention_mask = self._micro_batches(attention_mask)
        position_ids = self._micro_batches(position_ids)
        teacher_values = self._micro_batches(teacher_values, 2)
        teacher_indices = self._micro_batches(teacher_indices, 2)
        # tokens the loss counts: each row's labels from position 1 on (CausalLMLoss shifts them by one)
        counted = (labels[:, :, 1:] != IGNORE_INDEX).astype(ms.float32).sum()
        if self.all_reduce is not None:
            counted = self.all_reduce(counted)
        tokens = ops.maximum(counted, 1.0)
        scale = self.scale.value()
        multiplier = scale * self.ranks / tokens
        multipliers = ops.broadcast_to(multiplier, (input_ids.shape[1],))
        grad_fn = ops.value_and_grad(self.scaled_loss_sum, None, self.weights)
        loss_total = ops.zeros((), ms.float32)
        grads = None
        for k in range(self.accumulation_steps):
            scaled, micro_grads = grad_fn(input_ids[k], labels[k], self._pick(attention_mask, k),
                                          self._pick(position_ids, k), multipliers, self._pick(teacher_values, k),
                                          self._pick(teacher_indices, k))
            loss_total = loss_total + ops.stop_gradient(scaled) / multiplier
            grads = micro_grads if grads is None else self.hyper_map(self.add, grads, micro_grads)
        if self.all_reduce is not None:
            loss_total = self.all_reduce(loss_total)
        grad_norm, finite, updated = self.apply_gradients(grads, scale)
        loss = ops.depend(loss_total / tokens, updated)
        return loss, grad_norm, ops.logical_not(finite), self.scale.value()

    def apply_gradients(self, grads, scale):
        """The update from accumulated gradients of the loss times `scale`: reduced over the ranks, unscaled,
        checked (the global norm), clipped, applied when finite; then the loss scale moves. Returns
        (grad_norm, finite, the optimizer's output for ``ops.depend``). Steps with another loss share it."""
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        grads = self.hyper_map(ops.partial(_scale_grad, 1.0 / scale), grads)
        grad_norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        finite = ops.isfinite(grad_norm)
        if self.clip_grad_norm is not None:
            coef = ops.minimum(self.clip_grad_norm / (grad_norm + 1e-6), 1.0)
            grads = self.hyper_map(ops.partial(_scale_grad, coef), grads)
        updated = self.optimizer(grads, finite)
        if self.dynamic:
            clean = ops.select(finite, self.clean_steps + 1, ops.zeros_like(self.clean_steps))
            grow = clean >= self.growth_interval
            new_scale = ops.select(finite, ops.select(grow, scale * self.growth_factor, scale),
                                   ops.maximum(scale * self.backoff_factor, 1.0))
            ops.assign(self.clean_steps, ops.select(grow, ops.zeros_like(clean), clean))
            ops.assign(self.scale, new_scale)
        return grad_norm, finite, updated

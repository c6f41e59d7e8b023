"""The compiled training step: gradient accumulation, loss scaling, all-finite check, clipping, AdamW.

One call is one optimizer update on K micro-batches:

    loss      = sum of token losses over the K micro-batches / tokens counted in all K
    gradients = d(loss)/d(weights), accumulated micro-batch by micro-batch (so equal to one step on the
                concatenated batch even when micro-batches count different numbers of tokens, like transformers'
                ``num_items_in_batch``), summed over the ranks by ``grad_reducer`` if given, unscaled
                (with ``data_parallel`` ranks, tokens and the reported loss are summed over the ranks first, so data
                parallelism is exact too)
    skip      = any gradient not finite (then weights, moments and the step count stay as they were)
    grad_norm = global L2 norm before clipping; clipping as torch.nn.utils.clip_grad_norm_
    update    = AdamW at the scheduled rate; then the dynamic loss scale backs off or grows

The all-finite check is the global norm itself (the sum of squares is finite exactly when every gradient is finite
and the norm fits in fp32): plain arithmetic, so it runs on CPU and Ascend alike (910B computes in INF/NAN mode),
where MindSpore's DynamicLossScaleManager and float-status ops are Ascend/GPU-only. Under semi-auto parallel the
norm is written in MindSpore's global-norm pattern (``_square_sum``), for which its compiler all-reduces the sum
of squares over the devices of a stage and across the pipeline stages: every rank clips by the same factor and
skips the same steps (docs/ascend_readiness.md derives it).

``GRPOStep`` is the same step on a batch of rollouts with the GRPO loss (``rl.grpo.GRPOLoss``): everything after
the gradients is the one ``TrainStep.apply_gradients``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import mindspore as ms
from mindspore import Parameter, Tensor, lazy_inline, nn, ops
from mindspore.ops import operations as P

from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.config_utils import require
from mindspore_llm.distill import DistillationModel
from mindspore_llm.models.layers import Precision
from mindspore_llm.models.moe import aux_loss_multipliers, set_aux_loss_multiplier
from mindspore_llm.rl.grpo import GRPOLoss
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


# MindSpore's global-norm marker (its ops.clip_by_global_norm writes the same): under semi-auto parallel a compiler
# pass (parallel_postprocessor.cc, HandleGlobalNormScale) follows each gradient through Mul/Cast/Depend/Square/
# ReduceSum to an ExpandDims carrying "grad_scale", divides that square sum by the number of devices holding the same
# slice (so a replicated norm weight counts once), and all-reduces the Sqrt's input over the devices of the stage and
# across the stages. Any other op between a gradient and this pattern (an Add, say) hides it from the pass.
_square_sum = ops.MultitypeFuncGraph("square_sum")
_expand_dims = P.ExpandDims().add_prim_attr("grad_scale", True)
_reduce_sum = P.ReduceSum(keep_dims=False)


@_square_sum.register("Bool", "Tensor")
def _square_sum_tensor(rows_first, grad):
    """`rows_first` (CPU): the last axis, then the rest. MindSpore 2.10's CPU ReduceSum over every axis of a
    (32000, 512) gradient takes 46-50 ms, over the last one and then the rest 10-13 ms (2 threads, the same sum); a
    cluster keeps the single ReduceSum of the pattern above."""
    squares = ops.square(grad.astype(ms.float32))
    if rows_first and squares.ndim > 1:
        squares = _reduce_sum(squares, -1)
    return _expand_dims(_reduce_sum(squares, ()), 0)


_scale_grad = ops.MultitypeFuncGraph("scale_grad")


@_scale_grad.register("Tensor", "Tensor")
def _scale_grad_tensor(factor, grad):
    return grad * factor.astype(grad.dtype)


def _reused_on_ascend(init):
    """MindSpore's ``lazy_inline`` on the backend that runs it: the cell is compiled once and called per micro-batch
    (Pipeline's micro-batches, the accumulation loop's), instead of its graph being unrolled micro-batches x layers
    times. MindSpore 2.10 supports it only on the outermost cell under a pipeline (its pipeline tutorial), which is
    this loss cell, and only on Ascend: the CPU backend refuses the reused subgraph ("Input[0] must be a Primitive
    ValueNode"), so elsewhere the cell is inlined as usual."""
    reused = lazy_inline(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        (reused if ms.get_context("device_target") == "Ascend" else init)(self, *args, **kwargs)

    return __init__


class ScaledLossSum(nn.Cell):
    """One micro-batch's token-loss sum times its multiplier (loss scale / tokens counted in the whole step).

    ``multiplier`` is a (rows,) vector of that one value so that every input is batch-major: a pipeline
    (``mindspore.parallel.nn.Pipeline``) slices each input into its micro-batches along dim 0 and sums the outputs,
    which stays the scaled token-loss sum. (A mixture-of-experts balance loss gets its gradient weight from the
    layer's own ``aux_loss_multiplier`` buffer, which the step sets before the forward pass.)
    """

    @_reused_on_ascend
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, labels, attention_mask, position_ids, multiplier):
        # [0], not `total, _ = ...`: the unused tuple element would be an isolated node, which MindSpore's
        # side-effect pass drops with "Some side effect nodes were eliminated by mistake"
        return self.model.loss_sum(input_ids, labels, attention_mask, position_ids)[0] * multiplier[0]


class ScaledDistillationLossSum(ScaledLossSum):
    """``ScaledLossSum`` of offline distillation: the batch's stored teacher top-k (values, token ids) come along,
    batch-major like the rest."""

    def construct(self, input_ids, labels, attention_mask, position_ids, multiplier, teacher_values,
                  teacher_indices):
        return self.model.loss_sum(input_ids, labels, attention_mask, position_ids, teacher_values,
                                   teacher_indices)[0] * multiplier[0]


class _Differentiated(nn.Cell):
    """The function the step differentiates, with a fixed parameter list: ``value_and_grad`` counts the parameters of
    what it differentiates, and ``Pipeline.construct(*args, **kwargs)`` counts two ("The parameters number of the
    function is 2, but the number of provided arguments is 7"). It calls the (possibly pipelined) loss with tensors
    only: a pipeline takes the shape of every input, so None cannot pass it."""

    def __init__(self, loss):
        super().__init__(auto_prefix=False)
        self.loss = loss

    def construct(self, input_ids, labels, attention_mask, position_ids, multiplier):
        return self.loss(input_ids, labels, attention_mask, position_ids, multiplier)


class _DifferentiatedWithTeacher(_Differentiated):
    def construct(self, input_ids, labels, attention_mask, position_ids, multiplier, teacher_values,
                  teacher_indices):
        return self.loss(input_ids, labels, attention_mask, position_ids, multiplier, teacher_values,
                         teacher_indices)


class TrainStep(nn.Cell):
    """``step(input_ids, labels, attention_mask=None, position_ids=None, teacher_values=None, teacher_indices=None)
    -> (loss, grad_norm, overflow, loss_scale)``.

    Inputs are (K*b, S) (micro-batch k is rows k*b..(k+1)*b-1) or stacked (K, b, S); the teacher top-k of offline
    distillation (a ``DistillationModel`` without teacher) is (K*b, S, k) or (K, b, S, k). ``loss_scale`` is the scale
    the next step will use. The K micro-batches run one after another inside the one compiled graph, so the graph
    (and its compile time) grows with K.

    The parallel context (``ParallelContext.step_parallelism``) supplies the rest:
      - ``grad_reducer``: a cell that sums the gradients over the ranks (``nn.DistributedGradReducer(mean=False)``)
        or collects a pipeline's accumulated gradients (``PipelineGradReducer``);
      - ``data_parallel``: the ranks that each feed a different part of the batch (DATA_PARALLEL); the tokens and
        the loss are summed over them, so the multiplier divides by the tokens of the whole global batch;
      - ``wrap_loss``: wraps ``ScaledLossSum`` (``Pipeline(cell, micro_batch_num)``); then every input must be a
        tensor (no None) and K is 1.

    Saved state besides the model and optimizer: ``loss_scale.scale`` and ``loss_scale.clean_steps``.
    """

    def __init__(self, model, optimizer: AdamW, precision: PrecisionConfig, accumulation_steps: int = 1,
                 clip_grad_norm: float | None = None, *, grad_reducer=None, data_parallel: int = 1, wrap_loss=None):
        super().__init__(auto_prefix=False)
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if wrap_loss is not None and accumulation_steps != 1:
            raise ValueError(f"accumulation_steps must be 1 with a pipeline (its micro-batches accumulate), got "
                             f"{accumulation_steps}")
        # offline distillation: the student learns from stored teacher top-k, fed with every batch
        self.teacher_topk = isinstance(model, DistillationModel) and model.teacher is None
        loss = ScaledDistillationLossSum(model) if self.teacher_topk else ScaledLossSum(model)
        self.pipelined = wrap_loss is not None
        if self.pipelined:
            loss = wrap_loss(loss)
        self.differentiated = _DifferentiatedWithTeacher(loss) if self.teacher_topk else _Differentiated(loss)
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.accumulation_steps = accumulation_steps
        self.clip_grad_norm = clip_grad_norm
        self.grad_reducer = grad_reducer
        self.all_reduce = P.AllReduce() if data_parallel > 1 else None
        self.dynamic = precision.loss_scale == "dynamic"
        initial_scale = 1.0 if precision.loss_scale == "none" else float(precision.initial_scale)
        self.scale = Parameter(Tensor(initial_scale, ms.float32), name="loss_scale.scale", requires_grad=False)
        self.clean_steps = Parameter(Tensor(0, ms.int32), name="loss_scale.clean_steps", requires_grad=False)
        self.growth_interval = precision.growth_interval
        self.growth_factor = precision.growth_factor
        self.backoff_factor = precision.backoff_factor
        self.hyper_map = ops.HyperMap()
        self.add = ops.Add()
        self.norm_rows_first = ms.get_context("device_target") == "CPU"  # see _square_sum_tensor
        # MoE balance losses are averaged over the step's sequences as the token loss is over its tokens
        self.aux_loss_multipliers = aux_loss_multipliers(model)
        self.moe_aux_losses = len(self.aux_loss_multipliers) > 0

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
        if self.pipelined and (attention_mask is None or position_ids is None):
            raise ValueError("TrainStep: under a pipeline every input must be a tensor; give attention_mask and "
                             "position_ids")
        if self.teacher_topk and teacher_values is None:
            raise ValueError("TrainStep: offline distillation needs the batch's teacher_values and teacher_indices")
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
        multiplier = scale / tokens
        multipliers = ops.broadcast_to(multiplier, (input_ids.shape[1],))
        if self.moe_aux_losses:
            self.weight_balance_losses(scale, input_ids.shape[0] * input_ids.shape[1])
        grad_fn = ops.value_and_grad(self.differentiated, None, self.weights)
        loss_total = ops.zeros((), ms.float32)
        grads = None
        for k in range(self.accumulation_steps):
            if self.teacher_topk:
                scaled, micro_grads = grad_fn(input_ids[k], labels[k], self._pick(attention_mask, k),
                                              self._pick(position_ids, k), multipliers, teacher_values[k],
                                              teacher_indices[k])
            else:
                scaled, micro_grads = grad_fn(input_ids[k], labels[k], self._pick(attention_mask, k),
                                              self._pick(position_ids, k), multipliers)
            loss_total = loss_total + ops.stop_gradient(scaled) / multiplier
            grads = micro_grads if grads is None else self.hyper_map(self.add, grads, micro_grads)
        if self.all_reduce is not None:
            loss_total = self.all_reduce(loss_total)
        grad_norm, finite, updated = self.apply_gradients(grads, scale)
        loss = ops.depend(loss_total / tokens, updated)
        return loss, grad_norm, ops.logical_not(finite), self.scale.value()

    def weight_balance_losses(self, scale, sequences: int):
        """Before the forward passes: the MoE balance losses' gradient weight, `scale` / the sequences of the step
        (summed over the data-parallel ranks), so that each sequence's balance loss counts once."""
        sequences = ops.full((), sequences, dtype=ms.float32)
        if self.all_reduce is not None:
            sequences = self.all_reduce(sequences)
        set_aux_loss_multiplier(self.aux_loss_multipliers, scale / sequences)

    def apply_gradients(self, grads, scale):
        """The update from the step's gradients of (its loss x `scale`): reduced over the ranks, unscaled, checked
        (the global norm), clipped, applied when finite; then the loss scale moves. Returns (grad_norm, finite, the
        optimizer's output to ``ops.depend`` on). Every kind of step (``train/grpo.py``'s too) ends here."""
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        grads = self.hyper_map(ops.partial(_scale_grad, 1.0 / scale), grads)
        square_sums = self.hyper_map(ops.partial(_square_sum, self.norm_rows_first), grads)
        grad_norm = ops.sqrt(ops.addn(square_sums)).reshape(())
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


# GRPOStep's inputs, in order
ROLLOUT_INPUTS = ("input_ids", "attention_mask", "position_ids", "old_log_probs", "ref_log_probs", "advantages",
                  "token_weights")


class GRPOStep(TrainStep):
    """``step(input_ids, attention_mask, position_ids, old_log_probs, ref_log_probs, advantages, token_weights)
    -> (loss, grad_norm, overflow, loss_scale, statistics)``: one optimizer update on the K micro-batches of a
    batch of rollouts (inputs (K*b, ...) as ``ROLLOUT_INPUTS``); the loss is the GRPO loss of ``GRPOLoss``, its
    aggregation carried by ``token_weights``; ``statistics`` the sums of ``GRPOLoss``'s statistics. Everything after
    the gradients is ``TrainStep.apply_gradients``; its saved state is a ``TrainStep``'s.

    The token weights already divide by the counts of the whole global batch (``rl.grpo.token_weights``), so each
    rank's loss is its share of the global loss: the multiplier is the loss scale alone, and the gradients summed
    over the ranks (the reducer) are the global batch's."""

    def __init__(self, model, optimizer, precision, accumulation_steps: int = 1, clip_grad_norm: float | None = None,
                 *, grpo, prompt_length: int, grad_reducer=None, data_parallel: int = 1, wrap_loss=None):
        if wrap_loss is not None:
            raise ValueError("GRPOStep: rollouts run without pipeline stages")
        super().__init__(model, optimizer, precision, accumulation_steps, clip_grad_norm,
                         grad_reducer=grad_reducer, data_parallel=data_parallel)
        self.differentiated = GRPOLoss(model, grpo, prompt_length)

    def construct(self, input_ids, attention_mask, position_ids, old_log_probs, ref_log_probs, advantages,
                  token_weights):
        inputs = [self._micro_batches(x, x.ndim - 1) for x in
                  (input_ids, attention_mask, position_ids, old_log_probs, ref_log_probs, advantages, token_weights)]
        scale = self.scale.value()
        multipliers = ops.broadcast_to(scale, (inputs[0].shape[1],))
        if self.moe_aux_losses:
            self.weight_balance_losses(scale, input_ids.shape[0])
        grad_fn = ops.value_and_grad(self.differentiated, None, self.weights, has_aux=True)
        loss_total = ops.zeros((), ms.float32)
        statistics = ops.zeros((3,), ms.float32)
        grads = None
        for k in range(self.accumulation_steps):
            (scaled, micro_statistics), micro_grads = grad_fn(*[x[k] for x in inputs], multipliers)
            loss_total = loss_total + ops.stop_gradient(scaled) / scale
            statistics = statistics + micro_statistics
            grads = micro_grads if grads is None else self.hyper_map(self.add, grads, micro_grads)
        if self.all_reduce is not None:  # the rank's shares of the global loss and sums
            loss_total = self.all_reduce(loss_total)
            statistics = self.all_reduce(statistics)
        grad_norm, finite, updated = self.apply_gradients(grads, scale)
        loss = ops.depend(loss_total, updated)
        return loss, grad_norm, ops.logical_not(finite), self.scale.value(), statistics

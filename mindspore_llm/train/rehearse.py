"""``msllm rehearse CONFIG``: a cluster job's training step, built as the trainer builds it, run on this machine at
toy size, and compared with the same toy model trained without the wrappers.

What is taken from CONFIG as it is: ``parallel:`` (mesh, stages, recompute, optimizer sharding, sequence and vocab
parallel), ``precision:``, ``train:`` (micro-batch size, accumulation), ``lora:`` and ``distill:``. What shrinks:
the model's dimensions (``assembly.toy_model_config``: same family and variant, every split dimension still
divisible), the sequence (16 tokens, a multiple of model_parallel under sequence parallelism) and, with a
pipeline, the micro-batches (2: the graph unrolls every micro-batch, and on CPU MindSpore cannot reuse one
compiled micro-batch, so 128 would compile for many minutes; the wiring is the same for any count). Where the CPU
cannot do what the job does, the rehearsal says what it did instead: bf16 compute runs as fp16 (no bf16 matmul on
CPU), and the semi-auto ``AutoParallel`` wrapper is built but not called (CPU refuses semi-auto parallel), so the
step it wraps runs stand-alone, where the op strategies are inert.

The wrapped step (an Ascend job's: ``Pipeline``, ``PipelineGradReducer``, optimizer-shard flag, stages, recompute
marks, LoRA) and the reference (the same weights, no plan, no wrappers, one step on the whole batch) run the same
batches; every step's loss, gradient norm and skip decision, and every parameter's AdamW moments after each step
(the first moment is (1 - beta1) x the clipped gradient) must agree. LoRA's B starts random rather than zero so
that both adapters have gradients; with LoRA dropout the comparison runs without it (random masks cannot match
across batch groupings), and an eager forward shows the dropout acting in training mode only. For ``kind: grpo``
the step is the ``GRPOStep`` (the GRPO loss, then the same gradient tail) fed random rollouts of 8 prompt and 8
completion slots with the config's aggregation, KL and clip range (``assembly.toy_rollouts``).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.models.kernels import PRIMITIVES, Kernels, select_kernels
from mindspore_llm.models.layers import Precision
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.context import SEMI_AUTO, STANDALONE, ParallelContext
from mindspore_llm.parallel.zero import describe
from mindspore_llm.train.assembly import (build_step, build_toy_model, cluster_shapes, quantization_block, toy_batch,
                                          toy_model_config, toy_parallel, toy_rollouts, toy_seq_length)
from mindspore_llm.train.config import TrainConfig
from mindspore_llm.train.optim import HOST, fused_by_default, placement
from mindspore_llm.train.trainer import BATCH_KEYS, check_parallel_settings

# Agreement between the wrapped and the reference step (both run on this CPU, the same arithmetic on other batch
# groupings): see the measured values in docs/ascend_readiness.md; each tolerance is ~10x the largest measured.
# "moment" holds after the first step; "later_moment" after the others: AdamW's first update is lr g / (|g| + eps),
# about +-lr, so an element whose gradient is rounding noise can take the other sign on a last-bit difference, and
# the next gradients then differ by ~1e-4 of their tensor's largest value (1.7e-4 measured on tiny_qwen_sft).
TOLERANCE = {"fp32": {"loss": 1e-5, "grad_norm": 1e-5, "moment": 1e-4, "later_moment": 2e-3},
             "fp16": {"loss": 2e-3, "grad_norm": 5e-3, "moment": 3e-2, "later_moment": 3e-2}}
MICRO_BATCHES = 2


@dataclass
class Rehearsal:
    lines: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _here(precision) -> Precision:
    """The model precision of what runs on this machine: the decomposed kernels whatever MSLLM_KERNELS says (the
    CPU has no fused ones); the cluster's kernels are constructed, not run (``fused_graph_ops``)."""
    return dataclasses.replace(precision.model_precision(), kernels=Kernels())


def fused_graph_ops(model, inputs, directory: Path) -> list[str]:
    """Construct `model`'s training graph (the token-loss sum and its gradients by every trainable weight) as far as
    this CPU can, by exporting it to MindIR: parsing, shape and type inference, automatic differentiation. Returns
    the fused primitives (and their gradients) the graph holds. Executing it needs the Ascend kernels."""
    import mindspore as ms
    from mindspore import nn, ops

    class TokenLoss(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def construct(self, input_ids, labels, attention_mask, position_ids):
            return self.net.loss_sum(input_ids, labels, attention_mask, position_ids)[0]

    class Gradients(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.weights = ms.ParameterTuple(net.trainable_params())
            self.grad = ops.GradOperation(get_by_list=True)

        def construct(self, *batch):
            return self.grad(self.net, self.weights)(*batch)

    file = directory / "fused_training_graph"
    ms.export(Gradients(TokenLoss(model)), *inputs, file_name=str(file), file_format="MINDIR")
    graph = file.with_suffix(".mindir").read_bytes()
    # a primitive appears as a node's op_type (protobuf field 2, length-prefixed) or as a reference "REF::Name:id"
    return [name for op in PRIMITIVES.values() for name in (op, op + "Grad")
            if bytes((0x12, len(name))) + name.encode() + b'"' in graph or f"REF::{name}:".encode() in graph]


def _job_context(config: TrainConfig, parallel: ParallelConfig) -> ParallelContext:
    """The context the trainer's ``setup_parallel`` returns on the job's logging rank (the first of the last
    stage): SEMI_AUTO for an Ascend job, stand-alone for one CPU process."""
    if config.device_target != "Ascend":
        return ParallelContext(0, 1, STANDALONE, "stand-alone (1 CPU process)", 0, 1, 1)
    world = parallel.device_num
    main = world - world // parallel.pipeline_stages
    return ParallelContext(main, world, SEMI_AUTO,
                           f"SEMI_AUTO_PARALLEL dp={parallel.data_parallel} mp={parallel.model_parallel} "
                           f"pp={parallel.pipeline_stages}, rank {main} of {world}", 0, 1, parallel.data_parallel,
                           parallel.pipeline_stages, parallel.micro_batch_num, parallel.optimizer_shard)


def _copy_weights(source, target) -> None:
    """`source`'s values into `target`'s parameters of the same names (a dropout key only one of them has is the
    step's to set)."""
    values = {p.name: p for p in source.get_parameters()}
    for param in target.get_parameters():
        if param.name in values:
            param.set_data(values[param.name].value().copy())


def _moments(step) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in (*step.optimizer.exp_avg, *step.optimizer.exp_avg_sq)}


def rehearse(config: TrainConfig, source: str, steps: int = 2, echo: Callable[[str], None] = print) -> Rehearsal:
    """Rehearse `config`'s job (see the module docstring); `echo` receives each line as it is known."""
    import mindspore as ms

    from mindspore_llm.lora import lora_layers
    from mindspore_llm.models.auto import build_model
    from mindspore_llm.parallel.plan import check_strategies, trace_input_shapes, validate_plan
    from mindspore_llm.train.grpo import check_rollout_parallelism
    from mindspore_llm.train.optim import AdamW
    from mindspore_llm.train.step import ROLLOUT_INPUTS, GRPOStep, TrainStep

    result = Rehearsal()

    def say(line: str) -> None:
        result.lines.append(line)
        echo(line)

    real, parallel, run = config.model_config(), config.parallel, config.train
    say(f"rehearsal of {source}")
    context = _job_context(config, parallel)
    check_parallel_settings(config, context)
    if context.mode == SEMI_AUTO:
        validate_plan(real, parallel, parallel.device_num, run.global_batch_size, run.micro_batch_size,
                      run.gradient_accumulation_steps, config.seq_length,
                      config.lora.quantization if config.lora is not None else None)
        say(f"  the real plan: {real.architecture}, {parallel.device_num} devices (dp {parallel.data_parallel} x mp "
            f"{parallel.model_parallel} x pp {parallel.pipeline_stages}) validated against the model's dimensions")

    # -- the toy job --------------------------------------------------------------------------------------------
    toy = toy_model_config(real, parallel, quantization_block=quantization_block(config))
    kept_every_token = getattr(toy, "moe_dispatch", None) == "capacity"
    if kept_every_token:
        # Which token-slot an expert drops at its capacity is a comparison of routing weights: a last-bit difference
        # between the two batch groupings compared (measured: 6e-7 in the moments after step 1) flips some slots at
        # step 2 and moves those experts' moments by 2e-2. With a factor of E / k (C = S) nothing is dropped and the
        # two steps agree to 1e-6; the drop rule itself is tested against NumPy (tests/test_moe.py).
        toy = dataclasses.replace(toy, moe_capacity_factor=toy.n_routed_experts / toy.num_experts_per_tok)
    toy_plan = toy_parallel(parallel, toy.num_hidden_layers)
    pipelined = parallel.pipeline_stages > 1
    grpo = None
    if config.kind == "grpo":  # rollouts of half prompt, half completion slots
        check_rollout_parallelism(context)
        grpo = dataclasses.replace(config.grpo, max_new_tokens=toy_seq_length(config.seq_length, parallel) // 2)
    micro = MICRO_BATCHES if pipelined else 1
    context = dataclasses.replace(context, micro_batch_num=micro)
    seq = toy_seq_length(config.seq_length, parallel)
    precision = config.precision
    if precision.compute_dtype == "bf16":
        precision = dataclasses.replace(precision, compute_dtype="fp32")
    lora = config.lora
    compared_lora = dataclasses.replace(lora, dropout=0.0) if lora is not None and lora.dropout > 0 else lora
    rows = run.rank_batch_size(micro) * context.data_parallel // context.data_world_size
    heads = (f"{toy.num_attention_heads}/{toy.num_key_value_heads} heads" if hasattr(toy, "num_key_value_heads")
             else f"{toy.num_attention_heads} heads, {toy.n_routed_experts} routed experts (top "
                  f"{toy.num_experts_per_tok})")
    say(f"  toy model: {toy.architecture}, {toy.num_hidden_layers} layers, hidden {toy.hidden_size}, {heads}, "
        f"vocab {toy.vocab_size} (real: {real.num_hidden_layers} layers, hidden {real.hidden_size}, vocab "
        f"{real.vocab_size})")
    say(f"  batch: {rows} {'rollouts' if grpo else 'rows'} of {seq} tokens (real {config.seq_length}) = "
        f"micro_batch_size {run.micro_batch_size} x accumulation {run.gradient_accumulation_steps}"
        + (f" x {micro} pipeline micro-batches (real {parallel.micro_batch_num})" if pipelined else "")
        + (f" x dp {context.data_parallel} (full batch)" if context.mode == SEMI_AUTO else ""))
    if kept_every_token:
        say(f"  MoE: capacity dispatch with factor {toy.moe_capacity_factor:g} (real {real.moe_capacity_factor:g}): "
            f"every token kept, so the two batch groupings route alike")
    if precision is not config.precision:
        say("  precision: compute bf16 -> fp32 (the CPU has no bf16 matmul, and fp16 rounding would differ between "
            f"the two batch groupings compared); level {precision.level}, loss_scale {precision.loss_scale}")

    # -- the plan on the toy twin: every stage, every op strategy against the shapes its op sees -----------------
    tick = time.perf_counter()
    ms.set_seed(run.seed)
    twin, applied = build_toy_model(toy, toy_plan, cluster_shapes(_here(precision)), compared_lora)
    stages = [layer.pipeline_stage for layer in twin.model.layers] if pipelined else [0] * toy.num_hidden_layers
    rng = np.random.default_rng(run.seed + 1)
    if grpo is None:
        batches = [toy_batch(rng, rows, seq, toy.vocab_size, config.data) for _ in range(steps)]
        traced = batches[0]
    else:
        prompt_length = seq - grpo.max_new_tokens
        batches = [toy_rollouts(rng, rows, prompt_length, grpo, toy.vocab_size) for _ in range(steps)]
        traced = {**batches[0], "labels": batches[0]["input_ids"]}  # the forward GRPO's log-probabilities take
    per_micro = rows // (micro * run.gradient_accumulation_steps)
    sample = [ms.Tensor(traced[key][:per_micro]) for key in BATCH_KEYS]
    check_strategies(applied, toy_plan, trace_input_shapes(twin, applied, lambda: twin.loss_sum(*sample)))
    say(f"  plan: layers on stages {stages}, recompute {toy_plan.recompute_of_layers(toy.num_hidden_layers)}; "
        f"{len(applied)} op strategies checked against the input shapes traced on a micro-batch of {per_micro} rows "
        f"(rank, divisibility, contracted dimensions) in {time.perf_counter() - tick:.1f} s")

    # -- the compiled pair: the job's step (wrappers, stages, recompute, LoRA) and the reference -----------------
    # stand-alone the stage numbers are inert, so past two stages the first and the last stand for all of them
    compiled_toy, compiled_plan = _first_and_last_stage(toy, toy_plan, micro)
    ms.set_seed(run.seed)
    model, _ = build_toy_model(compiled_toy, compiled_plan, _here(precision), compared_lora)
    reference = build_model(compiled_toy, _here(precision))
    if compared_lora is not None:
        from mindspore_llm.lora import apply_lora

        apply_lora(reference, compared_lora)
        lora_rng = np.random.default_rng(run.seed)
        for layer in lora_layers(model).values():  # random B: both adapters get gradients from step 1
            b = layer.lora_B.weight
            b.set_data(ms.Tensor(0.02 * lora_rng.standard_normal(b.shape).astype(np.float32)))
    _copy_weights(model, reference)
    trained, reference_trained, teacher_arrays = _with_distillation(config, compiled_toy, compiled_plan, precision,
                                                                    model, reference, rows, seq, steps, say)
    scratch = Path(tempfile.mkdtemp(prefix="msllm_rehearse_"))
    schedule = dataclasses.replace(config.schedule, warmup_steps=0, decay="constant",
                                   total_steps=max(steps, config.schedule.total_steps))
    job = dataclasses.replace(config, precision=precision, parallel=compiled_plan, schedule=schedule,
                              lora=compared_lora, output_dir=str(scratch), grpo=grpo,
                              checkpoint=dataclasses.replace(config.checkpoint, dir=None))
    reference_arguments = (reference_trained, AdamW(reference.trainable_params(), job.optimizer, schedule),
                           precision, 1, job.optimizer.clip_grad_norm)
    if grpo is None:
        step, compiled = build_step(trained, model.trainable_params(), job, context)
        reference_step = TrainStep(*reference_arguments)
        input_names = BATCH_KEYS
    else:
        step, compiled = build_step(trained, model.trainable_params(), job, context, prompt_length)
        reference_step = GRPOStep(*reference_arguments, grpo=grpo, prompt_length=prompt_length)
        input_names = ROLLOUT_INPUTS
    built = [context.description]
    if compiled_toy.num_hidden_layers != toy.num_hidden_layers:
        built.append(f"{compiled_toy.num_hidden_layers} layers standing for stages 0 and "
                     f"{parallel.pipeline_stages - 1}")
    if pipelined:
        built.append(f"Pipeline({micro} micro-batches) + {type(step.grad_reducer).__name__}"
                     f"(opt_shard={step.grad_reducer.opt_shard})")
    if type(compiled) is not type(step):
        built.append(f"compiled as {type(compiled).__name__} (built; the CPU refuses semi-auto parallel, so the step "
                     f"it wraps runs)")
    if grpo is not None:
        built.append(f"GRPOStep on rollouts of {prompt_length} prompt + {grpo.max_new_tokens} completion slots "
                     f"({grpo.loss_aggregation}, beta {grpo.beta}, clip {grpo.clip_low}/{grpo.clip_high})")
    if lora is not None:
        built.append(f"LoRA rank {lora.rank} on {len(lora_layers(model))} layers")
    built.append(describe(parallel))
    if parallel.offloads_optimizer:
        moments = [*step.optimizer.exp_avg, *step.optimizer.exp_avg_sq]
        built.append(f"{sum(placement(m) == HOST for m in moments)} of {len(moments)} AdamW moments placed on the "
                     f"host")
    say("  built: " + "; ".join(built))

    # -- the steps --------------------------------------------------------------------------------------------------
    tolerance = TOLERANCE["fp32" if precision.compute_dtype == "fp32" else "fp16"]
    say(f"  reference: the same weights, no plan and no wrappers, one step on the whole batch; tolerances "
        f"{tolerance}")
    # optimizer_shard false under a pipeline: the reducer reads the accu_grads buffers that MindSpore's pipeline pass
    # fills on the cluster; stand-alone they stay zero, so only the first step (its loss and the gradients the
    # pipeline computes, before the reducer) is comparable
    by_pass = pipelined and not compiled_plan.optimizer_shard
    pipeline_gradients = _pipeline_gradients(step, batches[0], teacher_arrays[0]) if by_pass else None
    step.set_train(True)
    reference_step.set_train(True)
    for i, batch in enumerate(batches[:1] if by_pass else batches):
        inputs = [ms.Tensor(batch[key]) for key in input_names] + [ms.Tensor(a) for a in teacher_arrays[i]]
        tick = time.perf_counter()
        got = [float(x.asnumpy()) for x in step(*inputs)[:4]]  # (loss, grad_norm, overflow, loss_scale)
        seconds = time.perf_counter() - tick
        want = [float(x.asnumpy()) for x in reference_step(*inputs)[:4]]
        errors = {"loss": _relative(got[0], want[0])}
        line = f"  step {i + 1} ({seconds:.1f} s): loss {got[0]:.6f} vs {want[0]:.6f} ({errors['loss']:.1e})"
        if not by_pass:
            errors["grad_norm"] = _relative(got[1], want[1])
            errors["moment"] = _moment_error(_moments(step), _moments(reference_step))
            line += (f", grad_norm {got[1]:.6f} vs {want[1]:.6f} ({errors['grad_norm']:.1e}), skipped "
                     f"{bool(got[2])} vs {bool(want[2])}, AdamW moments {errors['moment']:.1e}")
            if got[2] != want[2]:
                result.mismatches.append(f"step {i + 1}: skip decision {bool(got[2])} vs {bool(want[2])}")
        say(line)
        if by_pass:
            _compare_pipeline_gradients(pipeline_gradients, reference_step, want[1], job.optimizer, tolerance, result,
                                        say)
        for name, error in errors.items():
            if name == "moment" and i:
                name = "later_moment"
            if not error <= tolerance[name]:
                result.mismatches.append(f"step {i + 1}: {name} differs by {error:.2e} (tolerance {tolerance[name]})")
    if lora is not None and lora.dropout > 0:
        _check_dropout(config, compiled_toy, compiled_plan, precision, model, batches[0], say, result)
    # after the steps: the comparison is reported first, the export is the slowest part
    _rehearse_kernels(config, toy, toy_plan, compared_lora, sample, say, result)
    shutil.rmtree(scratch, ignore_errors=True)
    say("  result: " + ("OK, the job's step computes what the plain step computes" if result.ok else
                        "MISMATCH: " + "; ".join(result.mismatches)))
    return result


def _rehearse_kernels(config, toy, toy_plan, lora, sample, say, result) -> None:
    """Which kernels the job's device target selects; with fused ones, a one-layer toy's training graph built with
    them and constructed as far as this CPU can (``fused_graph_ops``): every fused primitive and its gradient must be
    in it."""
    cluster = select_kernels(config.device_target)
    say(f"  kernels on {config.device_target}:")
    for line in cluster.describe():
        say(f"    {line}")
    say("    adamw: " + ("AdamWeightDecay kernels" if fused_by_default(config.device_target) else
                         "decomposed (elementwise ops per weight; compiled and run in the steps below)"))
    if not cluster.fused:
        return
    tick = time.perf_counter()
    # one layer holds every fused op (the export's cost grows with the layers), planned as one stage
    layer = {"num_hidden_layers": 1}
    if hasattr(toy, "first_k_dense_replace"):
        layer["first_k_dense_replace"] = min(toy.first_k_dense_replace, 1)
    one_stage = dataclasses.replace(toy_plan, pipeline_stages=1, stage_layers=None, micro_batch_num=1,
                                    recompute="none")
    fused, _ = build_toy_model(dataclasses.replace(toy, **layer), one_stage,
                               dataclasses.replace(config.precision.model_precision(), kernels=cluster), lora)
    with tempfile.TemporaryDirectory(prefix="msllm_kernels_") as directory:
        found = fused_graph_ops(fused, sample, Path(directory))
    expected = [name for switch in cluster.fused for name in (PRIMITIVES[switch], PRIMITIVES[switch] + "Grad")]
    missing = [name for name in expected if name not in found]
    say(f"  fused graph: a one-layer toy's training graph with these kernels constructed here (MindIR export: shapes "
        f"and types inferred, gradients built) in {time.perf_counter() - tick:.1f} s, holding {', '.join(found)}; it "
        f"cannot execute on this CPU (MindSpore 2.10 has no CPU kernel for them), so the steps below run the "
        f"decomposition")
    if missing:
        result.mismatches.append(f"the fused training graph lacks {', '.join(missing)}")


def _first_and_last_stage(toy, toy_plan: ParallelConfig, micro: int):
    """(toy config, plan) of the model that is compiled: the toy itself, or past two stages two layers planned as
    two stages with the first and the last stage's recompute modes."""
    plan = dataclasses.replace(toy_plan, micro_batch_num=micro)
    if toy_plan.pipeline_stages <= 2:
        return toy, plan
    modes = toy_plan.recompute_of_layers(toy.num_hidden_layers)
    fields = {"num_hidden_layers": 2}
    if hasattr(toy, "first_k_dense_replace"):
        fields["first_k_dense_replace"] = min(toy.first_k_dense_replace, 1)
    return (dataclasses.replace(toy, **fields),
            dataclasses.replace(plan, pipeline_stages=2, recompute=[modes[0], modes[-1]]))


def _moment_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """The largest difference of any moment tensor, relative to its own largest value or, for tensors whose true
    gradient is (near) zero (a k_proj bias: softmax ignores a shift shared by all keys), 1% of the largest value of
    that kind of moment across the model."""
    error = 0.0
    for kind in ("optimizer.exp_avg.", "optimizer.exp_avg_sq."):
        names = [n for n in want if n.startswith(kind)]
        if not names:
            continue
        scale = max(np.abs(want[n]).max() for n in names)
        for name in names:
            floor = max(np.abs(want[name]).max(), 1e-2 * scale, 1e-30)
            error = max(error, float(np.abs(got[name] - want[name]).max() / floor))
    return error


def _with_distillation(config, toy, toy_plan, precision, model, reference, rows, seq, steps, say):
    """(trained, reference trained, teacher top-k arrays per step): the models themselves, or each inside a
    ``DistillationModel`` with a toy teacher (online) or random stored top-k logits (offline)."""
    distill = config.distill
    if distill is None or distill.mode == "online":
        no_arrays = [[] for _ in range(steps)]
    if distill is None:
        return model, reference, no_arrays
    from mindspore_llm.distill import DistillationModel
    from mindspore_llm.models.auto import build_model
    from mindspore_llm.models.config import load_config
    from mindspore_llm.parallel.plan import apply_plan

    if distill.mode == "offline":
        k = min(distill.top_k, toy.vocab_size)
        rng = np.random.default_rng(config.train.seed + 2)
        arrays = []
        for _ in range(steps):
            values = np.sort(rng.standard_normal((rows, seq, k)).astype(np.float32), axis=-1)[..., ::-1].copy()
            indices = np.argsort(rng.random((rows, seq, toy.vocab_size)), axis=-1)[..., :k].astype(np.int32)
            arrays.append([values, indices])
        cfg = dataclasses.replace(distill, top_k=k)
        say(f"  distillation: offline, random stored top-{k} teacher logits")
        return DistillationModel(model, cfg, None), DistillationModel(reference, cfg, None), arrays
    teacher_dir = Path(distill.teacher)
    real_teacher = load_config(teacher_dir) if (teacher_dir / "config.json").is_file() else None
    teacher_config = toy_model_config(real_teacher or toy, config.parallel, vocab_size=toy.vocab_size)
    teachers = [build_model(teacher_config, _here(precision)) for _ in range(2)]
    apply_plan(teachers[0], toy_plan)
    _copy_weights(teachers[0], teachers[1])
    say(f"  distillation: online, toy teacher {teacher_config.architecture} "
        + (f"shrunk from {teacher_dir}" if real_teacher else f"of the student's shape ({teacher_dir} not found)"))
    return (DistillationModel(model, distill, teachers[0]), DistillationModel(reference, distill, teachers[1]),
            no_arrays)


def _pipeline_gradients(step, batch, teacher) -> list[np.ndarray]:
    """The gradients the step's (pipelined) loss produces on `batch`, before the reducer, at the current weights."""
    import mindspore as ms
    from mindspore import ops

    inputs = [ms.Tensor(batch[key]) for key in BATCH_KEYS]
    tokens = max(float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), 1.0)
    multiplier = ms.Tensor(np.full((len(batch["input_ids"]),), 1.0 / tokens, np.float32))
    grads = ms.jit(ops.grad(step.differentiated, None, step.weights))(*inputs, multiplier,
                                                                       *(ms.Tensor(a) for a in teacher))
    return [g.asnumpy() for g in grads]


def _compare_pipeline_gradients(got, reference_step, reference_norm, optimizer, tolerance, result, say):
    """`got` against the reference's first-step gradients, read back from its first moments: exp_avg = (1 - beta1)
    x the gradient clipped by min(1, clip / (norm + 1e-6)) (torch's rule, as the step clips)."""
    clip = 1.0 if optimizer.clip_grad_norm is None else min(1.0, optimizer.clip_grad_norm / (reference_norm + 1e-6))
    want = [m.asnumpy() / (1 - optimizer.beta1) / clip for m in reference_step.optimizer.exp_avg]
    error = _moment_error({f"optimizer.exp_avg.{i}": g for i, g in enumerate(got)},
                          {f"optimizer.exp_avg.{i}": w for i, w in enumerate(want)})
    say(f"  optimizer_shard false: the reducer reads the accu_grads buffers MindSpore's pipeline pass fills on the "
        f"cluster (zero stand-alone), so step 1 alone is compared, and the pipeline's own gradients: {error:.1e}")
    if not error <= tolerance["moment"]:
        result.mismatches.append(f"pipeline gradients differ by {error:.2e} (tolerance {tolerance['moment']})")


def _check_dropout(config, toy, toy_plan, precision, model, batch, say, result):
    """The job's LoRA dropout acts in training mode only: the same weights give another loss with it (run eagerly,
    without a compile; the step's own mode switch is tests/test_ascend_step.py's)."""
    import mindspore as ms

    with_dropout, _ = build_toy_model(toy, toy_plan, _here(precision), config.lora)
    _copy_weights(model, with_dropout)
    inputs = [ms.Tensor(batch[key]) for key in BATCH_KEYS]
    losses = {}
    graph_mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)  # eagerly: the mode is read as each layer runs
    try:
        for mode in (False, True):
            with_dropout.set_train(mode)
            losses[mode] = float(with_dropout.loss(*inputs).asnumpy())
    finally:
        ms.set_context(mode=graph_mode)
    say(f"  LoRA dropout {config.lora.dropout}: loss {losses[True]:.6f} in training mode, {losses[False]:.6f} in "
        f"evaluation mode (same weights)")
    if not abs(losses[True] - losses[False]) > 1e-6 * abs(losses[False]):
        result.mismatches.append("LoRA dropout did not act in training mode")

"""The pieces of the training step the Ascend job depends on, run as far as the CPU allows (docs/ascend_readiness.md):
the pipeline's gradient reducer for both optimizer-shard settings, AdamW state as clones of the weights (the link
that gives optimizer state its weight's layout), MindSpore's global-norm marker, the data-parallel degree taken
from the context, the side effect MindSpore reported dropping, train/eval mode, and the op strategies checked
against traced shapes (in the trainer, before compile).

Reference for the reducer: MindSpore's own arithmetic (grad / scale_sense, buffers zeroed), on known values.
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, ParameterTuple, Tensor, nn

from mindspore_llm.common import ConfigError
from mindspore_llm.models.auto import build_model
from mindspore_llm.models.config import config_from_yaml_section
from mindspore_llm.models.layers import Precision
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.context import SEMI_AUTO, ParallelContext, PipelineGradReducer
from mindspore_llm.parallel.plan import OpStrategy, apply_plan, check_strategies, trace_input_shapes
from mindspore_llm.train import step as step_module
from mindspore_llm.train.assembly import cluster_shapes
from mindspore_llm.train.optim import AdamW, OptimizerConfig, adamw_state
from mindspore_llm.train.schedule import ScheduleConfig
from mindspore_llm.train.step import PrecisionConfig, TrainStep

TINY = dict(architecture="Qwen2ForCausalLM", vocab_size=128, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(**fields):
    return build_model(config_from_yaml_section({**TINY, **fields}, "model"))


def batch(rows=4, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY["vocab_size"], (rows, seq)).astype(np.int32)
    return ids, np.ones((rows, seq), np.int32), np.tile(np.arange(seq, dtype=np.int32), (rows, 1))


# -- PipelineGradReducer ------------------------------------------------------------------------------------------

class _Reduce(nn.Cell):
    def __init__(self, reducer):
        super().__init__()
        self.reducer = reducer

    def construct(self, grads):
        return self.reducer(grads)


@pytest.fixture(scope="module")
def reducer_params():
    return ParameterTuple([Parameter(Tensor(np.zeros((2, 3), np.float32)), name="w"),
                           Parameter(Tensor(np.zeros(3, np.float32)), name="b")])


def test_mindspore_2_10_pipeline_grad_reducer_fails_without_optimizer_shard(reducer_params):
    """The defect worked around: MindSpore's own construct reads an undefined `grads` when opt_shard is False."""
    from mindspore.parallel.nn import PipelineGradReducer as MindSporeReducer

    grads = (Tensor(np.ones((2, 3), np.float32)), Tensor(np.ones(3, np.float32)))
    with pytest.raises(Exception, match="grads"):
        _Reduce(MindSporeReducer(reducer_params.clone("ms_accu"), opt_shard=False))(grads)


@pytest.mark.parametrize("opt_shard", [True, False])
def test_pipeline_grad_reducer_for_both_optimizer_shard_settings(reducer_params, opt_shard):
    """opt_shard: the gradients themselves; otherwise the accumulation buffers the pipeline pass fills. Either way
    divided by scale_sense, and the buffers are zero afterwards."""
    reducer = PipelineGradReducer(ParameterTuple(list(reducer_params)), scale_sense=4.0, opt_shard=opt_shard)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in reducer_params]
    accumulated = [rng.standard_normal(p.shape).astype(np.float32) for p in reducer_params]
    for buffer, value in zip(reducer.accu_grads, accumulated):
        buffer.set_data(Tensor(value))
    out = _Reduce(reducer)(tuple(Tensor(g) for g in grads))
    expected = grads if opt_shard else accumulated
    for got, want in zip(out, expected):
        np.testing.assert_allclose(got.asnumpy(), want / 4.0, rtol=1e-7)
    assert all(not buffer.asnumpy().any() for buffer in reducer.accu_grads)


# -- AdamW state --------------------------------------------------------------------------------------------------

def test_adamw_moments_are_clones_of_their_weights():
    """Every moment is recorded in its weight's param_info.cloned_obj (MindSpore slices and shards clones like their
    weight), keeps the checkpoint names, and starts as fp32 zeros without gradient."""
    model = tiny_model()
    params = model.trainable_params()
    optimizer = AdamW(params, OptimizerConfig(), ScheduleConfig(total_steps=10))
    assert len(optimizer.exp_avg) == len(optimizer.exp_avg_sq) == len(params)
    for weight, m, v in zip(params, optimizer.exp_avg, optimizer.exp_avg_sq):
        assert (m.name, v.name) == (f"optimizer.exp_avg.{weight.name}", f"optimizer.exp_avg_sq.{weight.name}")
        assert any(clone is m for clone in weight.param_info.cloned_obj), m.name
        assert any(clone is v for clone in weight.param_info.cloned_obj), v.name
        for moment in (m, v):
            assert moment.shape == weight.shape and moment.dtype == ms.float32 and not moment.requires_grad
            assert not moment.asnumpy().any()


def test_adamw_state_of_a_16_bit_weight_is_fp32():
    weights = ParameterTuple([Parameter(Tensor(np.ones(4), ms.float16), name="h")])
    exp_avg, exp_avg_sq = adamw_state(weights)
    assert exp_avg[0].dtype == exp_avg_sq[0].dtype == ms.float32
    assert any(clone is exp_avg[0] for clone in weights[0].param_info.cloned_obj)


# -- the global norm ----------------------------------------------------------------------------------------------

def test_square_sum_carries_mindspore_global_norm_marker():
    """Static: the per-gradient square sum ends in the ExpandDims MindSpore's semi-auto global-norm pass looks for
    (the attribute its ops.clip_by_global_norm sets), and its value is the sum of squares."""
    assert step_module._expand_dims.attrs.get("grad_scale") is True
    grad = Tensor(np.array([[1.0, -2.0], [3.0, 0.5]], np.float32))
    for rows_first in (False, True):  # the cluster's form and CPU's
        square_sum = step_module._square_sum_tensor(rows_first, grad)
        assert square_sum.shape == (1,) and float(square_sum.asnumpy()[0]) == pytest.approx(14.25)


# -- the data-parallel degree -------------------------------------------------------------------------------------

class _SummingReducer(nn.DistributedGradReducer):
    """A reducer whose internals must not be read: the step takes the data-parallel degree from the context."""

    def __init__(self):  # not super().__init__: it needs a process group
        nn.Cell.__init__(self)
        self.mean = True

    @property
    def degree(self):
        raise AssertionError("TrainStep read grad_reducer.degree")

    def construct(self, grads):
        return grads


def test_step_takes_the_data_parallel_degree_from_the_context_not_the_reducer():
    model = tiny_model()
    optimizer = AdamW(model.trainable_params(), OptimizerConfig(), ScheduleConfig(total_steps=10))
    step = TrainStep(model, optimizer, PrecisionConfig(), grad_reducer=_SummingReducer(), data_parallel=1)
    assert step.all_reduce is None  # one rank: nothing to sum


# -- side effects and train/eval mode -----------------------------------------------------------------------------

def test_compiling_the_step_drops_no_side_effect_node(capfd):
    """MindSpore warned "Some side effect nodes were eliminated by mistake" on every step compile (an unused tuple
    element of the loss call); the warning goes to the C++ log, so it is read from the process's stderr."""
    model = tiny_model()
    optimizer = AdamW(model.trainable_params(), OptimizerConfig(), ScheduleConfig(total_steps=10))
    step = TrainStep(model, optimizer, PrecisionConfig(), 2, 1.0)
    ids, mask, positions = batch()
    capfd.readouterr()
    step(Tensor(ids), Tensor(ids), Tensor(mask), Tensor(positions))
    assert "side effect nodes were eliminated" not in capfd.readouterr().err


def test_lora_dropout_acts_in_training_mode_only():
    """The trainer's mode switch (Trainer.set_train) on the step: in training mode a LoRA dropout of 0.5 changes the
    loss of the same weights; in evaluation mode the step's forward equals the model's plain loss."""
    from mindspore_llm.lora import LoraConfig, apply_lora, lora_layers

    model = tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    rng = np.random.default_rng(1)
    for layer in lora_layers(model).values():  # B != 0, so the adapters (and their dropout) reach the output
        layer.lora_B.weight.set_data(Tensor(rng.standard_normal(layer.lora_B.weight.shape).astype(np.float32)))
    ids, mask, positions = (Tensor(a) for a in batch())
    model.set_train(False)
    evaluation = float(model.loss(ids, ids, mask, positions).asnumpy())
    # a rate of 1e-30 leaves the fp32 weights as they were: both modes see the same weights
    optimizer = AdamW(model.trainable_params(), OptimizerConfig(), ScheduleConfig(lr=1e-30, total_steps=10))
    step = TrainStep(model, optimizer, PrecisionConfig(), 1, None)
    losses = {}
    for mode in (False, True):
        step.set_train(mode)
        losses[mode] = float(step(ids, ids, mask, positions)[0].asnumpy())
    assert losses[False] == pytest.approx(evaluation, rel=1e-5)
    # measured 6.4e-4 relative with the keyed masks (the tiny model's loss is near ln(vocab): hidden-state noise
    # moves it little); 10x the evaluation-mode agreement above
    assert abs(losses[True] - evaluation) > 1e-4 * evaluation, losses


def test_trainer_trains_in_training_mode_and_leaves_the_model_evaluating(tmp_path):
    """The trainer's first step with LoRA dropout 0.5 computes another loss than the same weights in evaluation
    mode; after the run every layer is back in evaluation mode (export, generation)."""
    from mindspore_llm.lora import lora_layers
    from mindspore_llm.train.config import train_config_from_dict
    from mindspore_llm.train.trainer import BATCH_KEYS, Trainer
    from tests.test_trainer import tiny_raw_config

    raw = tiny_raw_config(tmp_path, train={"steps": 1}, checkpoint={"every_n_steps": 1}, schedule={"warmup_steps": 0},
                          lora={"rank": 4, "alpha": 8.0, "dropout": 0.5, "target_modules": ["q_proj", "v_proj"]},
                          logging={"tensorboard": False, "plot": False, "progress_bar": False})
    trainer = Trainer(train_config_from_dict(raw, "lora.yaml"))
    rng = np.random.default_rng(2)
    for layer in lora_layers(trainer.model).values():
        layer.lora_B.weight.set_data(Tensor(rng.standard_normal(layer.lora_B.weight.shape).astype(np.float32)))
    first = next(trainer.dataset.batches(trainer.rank_batch))
    ms.set_context(mode=ms.PYNATIVE_MODE)  # eagerly, in evaluation mode
    try:
        evaluation = float(trainer.model.loss(*(Tensor(first[key]) for key in BATCH_KEYS)).asnumpy())
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    training = trainer.run().first_loss
    assert abs(training - evaluation) > 1e-3 * evaluation, (training, evaluation)
    assert not any(layer.training for layer in lora_layers(trainer.model).values())


# -- op strategies against traced shapes ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planned():
    """The tiny model as a cluster's strategy check traces it (``assembly.cluster_shapes``: ops broadcast, as on
    Ascend)."""
    parallel = ParallelConfig(data_parallel=2, model_parallel=2, sequence_parallel=True)
    model = build_model(config_from_yaml_section(TINY, "model"), cluster_shapes(Precision()))
    return model, apply_plan(model, parallel), parallel


def traced(model, applied, mask: bool):
    ids, ones, positions = (Tensor(a) for a in batch())
    return trace_input_shapes(model, applied, lambda: model.loss_sum(ids, ids, ones if mask else None, positions))


def test_traced_shapes_fit_the_plan_with_an_attention_mask(planned):
    model, applied, parallel = planned
    shapes = traced(model, applied, mask=True)
    assert all(shapes[op.path] for op in applied)  # every planned op was seen
    assert shapes["model.layers.0.self_attn.attention.add_bias"][0] == [(4, 4, 16, 16), (4, 1, 16, 16)]
    check_strategies(applied, parallel, shapes)


def test_unbatched_attention_bias_under_data_parallel_is_refused_before_compile(planned):
    """Without an attention mask the bias is (1, 1, S, S): dp 2 cannot split its first dimension."""
    model, applied, parallel = planned
    with pytest.raises(ConfigError, match=r"add_bias: input 1 dimension 0 of shape \(1, 1, 16, 16\) \(size 1\) "
                                          r"cannot be split 2 ways"):
        check_strategies(applied, parallel, traced(model, applied, mask=False))


def test_strategy_rank_and_contracted_dimensions_are_checked(planned):
    model, applied, parallel = planned
    shapes = traced(model, applied, mask=True)
    matmul = next(op for op in applied if op.path == "model.layers.0.self_attn.q_proj.matmul")
    wrong_rank = OpStrategy(matmul.path, ((2, 1, 1), (2, 1)), None, matmul.primitive)
    with pytest.raises(ConfigError, match=r"q_proj.matmul: input 0 has shape \(64, 32\) \(rank 2\) but strategy "
                                          r"\(2, 1, 1\)"):
        check_strategies([wrong_rank], parallel, shapes)
    split_apart = OpStrategy(matmul.path, ((1, 2), (2, 1)), None, matmul.primitive)  # x splits `in`, W does not
    with pytest.raises(ConfigError, match="contracted dimensions are split 2 and 1 ways"):
        check_strategies([split_apart], parallel, shapes)


def test_trainer_checks_the_op_strategies_before_compiling(tmp_path, monkeypatch):
    """Under semi-auto parallel the trainer traces a toy twin of its model with the job's kind of batch and refuses
    a strategy that does not fit, before the step is built."""
    from mindspore_llm.parallel import plan
    from mindspore_llm.train import trainer as trainer_module
    from mindspore_llm.train.config import train_config_from_dict
    from tests.test_trainer import tiny_raw_config

    parallel = dict(data_parallel=2, model_parallel=2)
    context = ParallelContext(0, 4, SEMI_AUTO, "test", 0, 1, 2)
    monkeypatch.setattr(trainer_module, "setup_parallel", lambda parallel, device: context)
    # no processes behind this context (the shared-storage check's all-reduce has nothing to reduce with) and the
    # CPU refuses semi-auto parallel (the compile before loading slices)
    monkeypatch.setattr(trainer_module.checkpointing, "check_shared_storage", lambda *args: None)
    monkeypatch.setattr(trainer_module.Trainer, "_compile", lambda self: None)
    raw = tiny_raw_config(tmp_path, parallel=parallel, train={"gradient_accumulation_steps": 1})
    trainer = trainer_module.Trainer(train_config_from_dict(raw, "semi.yaml"))
    assert trainer.compiled is not trainer.step_cell  # AutoParallel around the step
    norm = plan._rms_norm
    monkeypatch.setattr(plan, "_rms_norm", lambda rank_mp, dp, fused: {**norm(rank_mp, dp, fused),
                                                                        "mul_weight": ((dp, 1), (1,))})
    with pytest.raises(ConfigError, match=r"input_layernorm.mul_weight: input 0 has shape \(4, 16, 64\) \(rank 3\) "
                                          r"but strategy \(2, 1\)"):
        trainer_module.Trainer(train_config_from_dict(raw, "semi.yaml"))


# -- the console, and the dry run on a machine without the Ascend backend ------------------------------------------

def _cli(*args):
    import os
    import subprocess
    import sys

    from tests.test_trainer import REPO

    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    return subprocess.run([sys.executable, "-m", "mindspore_llm.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_mindspore_log_stays_off_the_console_unless_asked_for():
    quiet = _cli("train", "configs/tiny_qwen_sft.yaml", "--dry-run")
    assert quiet.returncode == 2 and "needs the Ascend backend" in quiet.stderr, quiet.stderr
    assert "[INFO]" not in quiet.stderr and "[WARNING]" not in quiet.stderr, quiet.stderr
    verbose = _cli("train", "configs/tiny_qwen_sft.yaml", "--dry-run", "-vv")
    assert verbose.returncode == 2 and verbose.stderr.count("[INFO]") > 10


def test_dry_run_of_an_ascend_job_without_the_ascend_backend_says_so():
    result = _cli("train", "configs/qwen2_5_32b_sft_8k_16p.yaml", "--dry-run")
    assert result.returncode == 2
    assert "--dry-run needs MindSpore's Ascend backend" in result.stderr and "Traceback" not in result.stderr


def test_dry_run_environment_compiles_one_rank_without_hccl():
    from mindspore_llm.parallel.context import simulation_environment

    parallel = ParallelConfig(model_parallel=8, pipeline_stages=2, micro_batch_num=4)
    assert simulation_environment(parallel, 8) == {"MS_SIMULATION_LEVEL": "1", "RANK_SIZE": "16", "RANK_ID": "8"}
    with pytest.raises(ConfigError, match=r"--rank 16: the job has ranks 0..15"):
        simulation_environment(parallel, 16)

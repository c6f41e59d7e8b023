"""ZeRO stages and host offload (issue 21), proven as far as the CPU allows.

- Numerics: training with ``offload_optimizer: host``, ``zero_stage`` set, or activation swap gives the losses of
  the plain run (the flags move memory, not arithmetic): measured identical (0 difference) on this CPU.
- Placement: every AdamW moment the trainer builds is a clone of its weight carrying the host-placement record.
- MindSpore's own validator: the project's mapping of every stage x offload choice is fed to ``AutoParallel`` and
  read back from MindSpore's parallel context; every combination the project refuses is one MindSpore refuses
  (raises) or cannot honour (ignores, or has no such thing).
- The planner: per-stage device bytes equal the formulas written here, the shipped 8-device 32B config does not fit
  at stage 1 without offload and fits with it, ``--compare-zero`` prints every row, and DeepSpeed's own estimators
  (DeepSpeed 0.19.8's own outputs, recorded) agree with ours where the semantics agree and differ by the terms named.
"""
import json
import math
import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from click.testing import CliRunner
from mindspore import Parameter, Tensor, nn
from mindspore.parallel._auto_parallel_context import (_reset_auto_parallel_context, _set_auto_parallel_context,
                                                       auto_parallel_context)
from mindspore.parallel._utils import _init_auto_parallel_context
from mindspore.parallel.auto_parallel import AutoParallel

from mindspore_llm.cli import main as cli_main
from mindspore_llm.common import ConfigError
from mindspore_llm.models.qwen import QwenConfig
from mindspore_llm.models.shapes import count_parameters, layer_parameter_shapes
from mindspore_llm.parallel import zero
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.memory import (GB, Offload, PlanInputs, Workload, compare_zero_report, estimate_memory,
                                           host_bytes_per_server, plan_report, zero_choices)
from mindspore_llm.train.config import load_plan_inputs, load_train_config
from mindspore_llm.train.optim import HOST, placement
from mindspore_llm.train.trainer import Trainer
from tests.test_trainer import tiny_config

ROOT = Path(__file__).resolve().parents[1]
OFFLOAD_8P = ROOT / "configs" / "qwen2_5_32b_sft_8k_8p_offload.yaml"
DEEPSEEK_2048P = ROOT / "configs" / "deepseek_v3_671b_pretrain_4k_2048p.yaml"
TINY = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, qkv_bias=True)


# -- numerics and placement ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(module_dir):
    """The tiny trainer job (4 steps) plain, with the moments on the host, at zero_stage 1 (stand-alone: the
    parallel optimizer is not applied, the flags are) with host offload, and with every layer's activations swapped."""
    variants = {"plain": {}, "host": {"offload_optimizer": "host"},
                "zero1_host": {"zero_stage": 1, "offload_optimizer": "host"}, "swap": {"recompute": "swap"}}
    results = {}
    before = os.environ.get(zero.RUNTIME_CONF)
    try:
        for name, parallel in variants.items():
            trainer = Trainer(tiny_config(module_dir / name, parallel=parallel, train={"steps": 4}))
            results[name] = (trainer, trainer.run(), os.environ.get(zero.RUNTIME_CONF))
    finally:  # the trainer sets it for the process; the rest of the session runs as before
        os.environ.pop(zero.RUNTIME_CONF, None)
        if before is not None:
            os.environ[zero.RUNTIME_CONF] = before
    return results


@pytest.mark.parametrize("variant", ["host", "zero1_host", "swap"])
def test_offload_zero_and_swap_flags_train_to_the_same_losses(runs, variant):
    plain = [loss for _, loss in runs["plain"][1].losses]
    got = [loss for _, loss in runs[variant][1].losses]
    assert len(got) == 4
    # the same arithmetic in the same order: measured bit-identical; 1e-7 relative is fp32 round-off headroom
    np.testing.assert_allclose(got, plain, rtol=1e-7, atol=0)


@pytest.mark.parametrize("variant,host", [("plain", False), ("host", True), ("zero1_host", True), ("swap", False)])
def test_every_adamw_moment_is_a_clone_of_its_weight_with_the_placement_flag(runs, variant, host):
    optimizer = runs[variant][0].step_cell.optimizer
    if host:  # the trainer set the runtime option host placement needs
        assert "switch_inline:False" in runs[variant][2]
    weights = list(optimizer.parameters)
    assert len(optimizer.exp_avg) == len(optimizer.exp_avg_sq) == len(weights) > 0
    for weight, m, v in zip(weights, optimizer.exp_avg, optimizer.exp_avg_sq):
        for moment in (m, v):
            assert any(clone is moment for clone in weight.param_info.cloned_obj), moment.name
            assert placement(moment) == (HOST if host else None), moment.name
        assert placement(weight) is None  # the fp32 master weights stay on the device
    assert placement(optimizer.step) is None


def test_the_runtime_option_is_set_only_when_offloading(monkeypatch):
    monkeypatch.setenv(zero.RUNTIME_CONF, "memory_statistics:True,switch_inline:True")
    assert zero.set_runtime_for(ParallelConfig()) is None
    assert zero.set_runtime_for(ParallelConfig(offload_optimizer="host")) == (
        "memory_statistics:True,switch_inline:False")  # the user's own options kept, ours replacing theirs
    monkeypatch.delenv(zero.RUNTIME_CONF)
    assert zero.set_runtime_for(ParallelConfig(offload_optimizer="host")) == "switch_inline:False"


def test_swap_marks_every_primitive_of_the_layer_for_offload(runs):
    model = runs["swap"][0].model
    prims = [p for layer in model.model.layers for p in layer._get_prims_recursively()]  # pylint: disable=W0212
    assert prims and all(p.attrs.get("offload") is True for p in prims)
    plain = runs["plain"][0].model
    assert not any(p.attrs.get("offload") for layer in plain.model.layers for p in layer._get_prims_recursively())


def test_the_rehearsal_builds_zero3_with_host_offload_on_the_2048_device_config():
    from mindspore_llm.train.rehearse import rehearse

    config = load_train_config(DEEPSEEK_2048P, ["parallel.zero_stage=3", "parallel.offload_optimizer=host"])
    result = rehearse(config, str(DEEPSEEK_2048P), steps=1, echo=lambda line: None)
    report = "\n".join(result.lines)
    assert result.ok, report
    assert "zero_stage 3 (hsdp level3, shard size -1, threshold 64 KB)" in report
    assert "compiled as AutoParallel" in report
    assert "AdamW moments placed on the host" in report


# -- MindSpore's validator ---------------------------------------------------------------------------------------

def _read_back(parallel: ParallelConfig) -> dict:
    """Feed the project's mapping to an AutoParallel cell and MindSpore's parallel context (what AutoParallel's
    compile does with it), and read MindSpore's flags back."""
    net = AutoParallel(nn.Dense(4, 4), parallel_mode="semi_auto")
    zero.configure_parallel_optimizer(net, parallel)
    try:
        _init_auto_parallel_context(net)
        context = auto_parallel_context()
        handle = context._context_handle  # pylint: disable=W0212
        return {"enabled": context.get_enable_parallel_optimizer(),
                "gradient_accumulation_shard": context.get_grad_accumulation_shard(),
                "zero3": handle.get_zero3(), "threshold": context.get_parallel_optimizer_threshold(),
                "shard_size": context.get_optimizer_weight_shard_size(), "fusion": dict(context.get_comm_fusion())}
    finally:
        _reset_auto_parallel_context()


@pytest.mark.parametrize("offload", ["none", "host"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_mindspore_accepts_every_stage_and_reads_its_level_back(stage, offload):
    parallel = ParallelConfig(data_parallel=4, zero_stage=stage, offload_optimizer=offload)
    parallel.validate()
    flags = _read_back(parallel)
    assert flags["enabled"] == (stage >= 1)
    # MindSpore: level2 turns gradient_accumulation_shard on, level3 turns it off and sets its zero3 flag
    assert flags["gradient_accumulation_shard"] == (stage == 2)
    assert flags["zero3"] == (stage == 3)
    if stage:
        assert flags["threshold"] == 64


def test_shard_size_threshold_and_comm_fusion_reach_mindspore():
    parallel = ParallelConfig(data_parallel=8, zero_stage=2, optimizer_shard_size=4, optimizer_shard_threshold_kb=0,
                              comm_fusion_mb={"allgather": 128, "reducescatter": 32})
    parallel.validate()
    flags = _read_back(parallel)
    assert (flags["threshold"], flags["shard_size"]) == (0, 4)
    assert flags["fusion"]["allgather"] == {"mode": "size", "config": 128}
    assert flags["fusion"]["reducescatter"] == {"mode": "size", "config": 32}


def _frontend_strings() -> str:
    """The messages compiled into MindSpore's parallel frontend (the C++ half of its validator)."""
    import re

    library = Path(ms.__file__).parent / "lib" / "libmindspore_frontend.so"
    return "\n".join(m.decode() for m in re.findall(rb"[ -~]{20,}", library.read_bytes()))


def _mindspore_refuses_level4():
    with pytest.raises(ValueError, match="level1"):
        AutoParallel(nn.Dense(2, 2)).hsdp(optimizer_level="level4")


def _mindspore_has_no_nvme():
    with pytest.raises(ValueError, match="Only 'CPU' and 'Remote'"):
        Parameter(Tensor(np.zeros(2, np.float32)), name="x", device="NVMe")


def _mindspore_ignores_a_group_of_one():
    context = auto_parallel_context()
    try:
        before = context.get_optimizer_weight_shard_size()
        context.set_optimizer_weight_shard_size(1)  # "invalid. Please use the integer larger than 1": ignored
        assert context.get_optimizer_weight_shard_size() == before
    finally:
        _reset_auto_parallel_context()


def _mindspore_refuses_shard_size_0():
    with pytest.raises(ValueError, match="shard_size"):
        AutoParallel(nn.Dense(2, 2)).hsdp(shard_size=0)


def _mindspore_skips_a_non_dividing_group():
    assert "does not satisfy the conditions, thus not apply optimizer shard" in _frontend_strings()


def _mindspore_refuses_a_negative_threshold():
    with pytest.raises(ValueError, match="threshold"):
        AutoParallel(nn.Dense(2, 2)).hsdp(threshold=-1)


def _mindspore_ignores_shard_settings_without_the_optimizer():
    net = AutoParallel(nn.Dense(2, 2))  # no hsdp(): the parallel optimizer config is never passed on
    net._optimizer_weight_shard_size = 2  # pylint: disable=W0212
    try:
        _init_auto_parallel_context(net)
        assert not auto_parallel_context().get_enable_parallel_optimizer()
        assert auto_parallel_context().get_optimizer_weight_shard_size() != 2
    finally:
        _reset_auto_parallel_context()


def _mindspore_refuses_negative_fusion():
    try:
        with pytest.raises(ValueError, match="fusion threshold"):
            _set_auto_parallel_context(comm_fusion={"allgather": {"mode": "size", "config": -1}})
    finally:
        _reset_auto_parallel_context()


def _mindspore_refuses_unknown_fusion():
    try:
        with pytest.raises(KeyError, match="comm fusion type"):
            _set_auto_parallel_context(comm_fusion={"broadcast": {"mode": "size", "config": 8}})
    finally:
        _reset_auto_parallel_context()


REFUSED = [  # (the project's fields, the key its error names, MindSpore's behaviour for the same request)
    (dict(zero_stage=4), "zero_stage", _mindspore_refuses_level4),
    (dict(offload_optimizer="nvme"), "offload_optimizer: 'nvme'", _mindspore_has_no_nvme),
    (dict(offload_optimizer="disk"), "offload_optimizer", _mindspore_has_no_nvme),
    (dict(zero_stage=2), "data_parallel is 1", _mindspore_ignores_a_group_of_one),
    (dict(zero_stage=3), "data_parallel is 1", _mindspore_ignores_a_group_of_one),
    (dict(data_parallel=4, zero_stage=1, optimizer_shard_size=0), "optimizer_shard_size",
     _mindspore_refuses_shard_size_0),
    (dict(data_parallel=4, zero_stage=1, optimizer_shard_size=1), "optimizer_shard_size",
     _mindspore_ignores_a_group_of_one),
    (dict(data_parallel=4, zero_stage=1, optimizer_shard_size=3), "optimizer_shard_size",
     _mindspore_skips_a_non_dividing_group),
    (dict(data_parallel=4, zero_stage=1, optimizer_shard_threshold_kb=-1), "optimizer_shard_threshold_kb",
     _mindspore_refuses_a_negative_threshold),
    (dict(data_parallel=4, optimizer_shard_size=2), "optimizer_shard_size",
     _mindspore_ignores_shard_settings_without_the_optimizer),
    (dict(data_parallel=4, zero_stage=1, comm_fusion_mb={"allgather": -1}), "comm_fusion_mb.allgather",
     _mindspore_refuses_negative_fusion),
    (dict(data_parallel=4, zero_stage=1, comm_fusion_mb={"broadcast": 8}), "comm_fusion_mb",
     _mindspore_refuses_unknown_fusion),
]


@pytest.mark.parametrize("fields,key,mindspore", REFUSED, ids=[m.__name__[11:] + f"-{i}" for i, (_, _, m) in
                                                               enumerate(REFUSED)])
def test_every_refused_combination_is_one_mindspore_refuses_or_cannot_honour(fields, key, mindspore):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        ParallelConfig(**fields).validate()
    mindspore()


def test_optimizer_shard_true_is_zero_stage_1():
    parallel = ParallelConfig(data_parallel=2, optimizer_shard=True)
    assert parallel.zero_stage == 1 and zero.hsdp_arguments(parallel)["optimizer_level"] == "level1"
    assert ParallelConfig(data_parallel=2, zero_stage=3).optimizer_shard  # the older name reads the stage
    assert not ParallelConfig().optimizer_shard


def test_yaml_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel: offload_optimizer: 'nvme' is not available"):
        load_train_config(OFFLOAD_8P, ["parallel.offload_optimizer=nvme"])
    with pytest.raises(ConfigError, match=r"parallel: zero_stage 2 .* data_parallel is 1"):
        load_train_config(OFFLOAD_8P, ["parallel.zero_stage=2"])


# -- DeepSpeed's JSON --------------------------------------------------------------------------------------------

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
             "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                   "stage3_param_persistence_threshold": 100000, "reduce_bucket_size": 500000000,
                                   "allgather_bucket_size": 200000000, "overlap_comm": True,
                                   "stage3_max_live_parameters": 1e9, "zero_fancy_new_key": 1}}


def test_deepspeed_json_maps_onto_the_parallel_section(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS_CONFIG))
    mapping = zero.deepspeed_overrides(path)
    config = load_train_config(DEEPSEEK_2048P, mapping.overrides)
    parallel = config.parallel
    assert (parallel.zero_stage, parallel.offload_optimizer) == (3, "host")
    assert parallel.optimizer_shard_threshold_kb == 391  # 100000 fp32 elements = 390.6 KB
    assert parallel.comm_fusion_mb == {"reducescatter": 1907, "allgather": 763}  # elements x 4 bytes, in MiB
    report = mapping.report(str(path))
    for ignored in ("offload_optimizer.pin_memory", "overlap_comm: MindSpore's graph compiler",
                    "stage3_max_live_parameters", "zero_fancy_new_key: no MindSpore 2.10 counterpart",
                    "bf16 (outside zero_optimization)", "train_micro_batch_size_per_gpu"):
        assert f"ignored: {ignored}" in report, report


@pytest.mark.parametrize("zero_block,message", [
    ({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}, r"offload_optimizer\.device: 'nvme'"),
    ({"stage": 5}, r"zero_optimization\.stage: 5"),
])
def test_deepspeed_json_errors_name_the_key(tmp_path, zero_block, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero_block}))
    with pytest.raises(ConfigError, match=message):
        zero.deepspeed_overrides(path)
    result = CliRunner().invoke(cli_main, ["train", str(OFFLOAD_8P), "--deepspeed", str(path)])
    assert result.exit_code == 2, result.output
    assert "zero_optimization" in result.output


# -- the planner ---------------------------------------------------------------------------------------------------

def _trainable_elements(config) -> int:
    return count_parameters(config)[0]


def _layer_elements(config) -> int:
    return sum(math.prod(shape) for _, shape in layer_parameter_shapes(config, 0))


@pytest.mark.parametrize("offload", ["none", "host"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_stage_device_bytes_equal_the_formula(stage, offload):
    """dp 4, tp 1, one stage, O2 (bf16 copy), every parameter sharded (threshold 0; every first dimension divides by
    4). P trainable elements, L of one layer; n = 4."""
    parallel = ParallelConfig(data_parallel=4, zero_stage=stage, offload_optimizer=offload,
                              optimizer_shard_threshold_kb=0 if stage else 64)
    terms = estimate_memory(TINY, parallel, Workload(32, 1, 2))[0]
    P, L, n = _trainable_elements(TINY), _layer_elements(TINY), 4
    expected = {  # bf16 copy, fp32 weight, fp32 gradient, AdamW m + v
        0: (2 * P, 4 * P, 4 * P, 8 * P),
        1: (2 * P, 4 * P / n, 4 * P, 8 * P / n),
        2: (2 * P, 4 * P / n, 4 * P / n, 8 * P / n),
        3: (0, 4 * P / n, 4 * P / n, 8 * P / n),
    }[stage]
    moments = expected[3]
    got = tuple(terms.terms[k] for k in ("compute weights", "fp32 weights", "gradients", "optimizer states"))
    assert got == pytest.approx((*expected[:3], 0 if offload == "host" else moments), rel=1e-12)
    assert terms.terms.get("gathered layer (ZeRO-3)", 0) == pytest.approx(6 * L if stage == 3 else 0, rel=1e-12)
    assert terms.host.get("optimizer states", 0) == pytest.approx(moments if offload == "host" else 0, rel=1e-12)
    assert terms.pcie_bytes(micro_batches=1) == pytest.approx(2 * moments if offload == "host" else 0, rel=1e-12)
    assert host_bytes_per_server([terms], parallel, 2) == pytest.approx(2 * moments if offload == "host" else 0)


def test_the_threshold_and_the_shard_size_decide_what_is_sharded():
    """At the default 64 KB only the embedding and the (untied) LM head, 256 x 64 fp32 = 64 KB each, are sharded;
    at 65 KB nothing is; a shard size of 2 splits them over 2 of the 4 replicas."""
    P, big = _trainable_elements(TINY), 2 * 256 * 64

    def moments(**fields):
        parallel = ParallelConfig(data_parallel=4, zero_stage=2, **fields)
        return estimate_memory(TINY, parallel, Workload(32, 1, 2))[0].terms["optimizer states"]

    assert moments() == 8 * (P - big) + 8 * big / 4
    assert moments(optimizer_shard_threshold_kb=65) == 8 * P
    assert moments(optimizer_shard_size=2) == 8 * (P - big) + 8 * big / 2


def test_swapped_activations_live_on_the_host():
    work = Workload(32, 1, 2)
    full = estimate_memory(TINY, ParallelConfig(recompute="full"), work)[0]
    none = estimate_memory(TINY, ParallelConfig(recompute="none"), work)[0]
    swap = estimate_memory(TINY, ParallelConfig(recompute="swap"), work)[0]
    assert swap.terms == full.terms  # on the device: what full recompute keeps, one layer brought back at a time
    layer_stored = (none.terms["activations"] - full.terms["activations"]) / TINY.num_hidden_layers
    assert swap.host["swapped activations"] == pytest.approx(TINY.num_hidden_layers * layer_stored)
    assert swap.pcie_bytes(micro_batches=3) == pytest.approx(2 * 3 * TINY.num_hidden_layers * layer_stored)


def test_the_32b_job_on_8_devices_needs_host_offload():
    inputs = load_plan_inputs(OFFLOAD_8P)
    rows = {(c.zero_stage, c.offload_optimizer): c for c in zero_choices(inputs)}
    assert len(rows) == 8
    assert rows[(1, "none")].device_bytes > 58 * GB > rows[(1, "host")].device_bytes
    assert rows[(2, "none")].refused and rows[(3, "host")].refused  # data_parallel 1
    # the moments of all 32.76B parameters, on the one server: 8 bytes each
    assert rows[(0, "host")].host_bytes_per_server == pytest.approx(8 * 32_763_876_352, rel=1e-3)


def test_msllm_plan_says_the_offload_config_fits_and_compares_every_choice():
    result = CliRunner().invoke(cli_main, ["plan", str(OFFLOAD_8P), "--device-num", "8", "--hbm-gb", "58",
                                           "--compare-zero"])
    assert result.exit_code == 0, result.output
    assert "-> fits" in result.output and "host memory: 244.1" in result.output
    table = result.output[result.output.index("ZeRO choices"):].splitlines()
    rows = [line.split() for line in table[2:] if line.split() and line.split()[0].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [(str(s), o) for s in range(4) for o in ("none", "host")]
    stage1 = load_plan_inputs(OFFLOAD_8P)
    stage1.parallel = ParallelConfig(**{**vars(stage1.parallel), "zero_stage": 1, "offload_optimizer": "none"})
    text, fits = plan_report(stage1, 8, 58)
    assert not fits and "DOES NOT FIT" in text


# -- DeepSpeed's estimators ---------------------------------------------------------------------------------------

# (host bytes per node, device bytes) that DeepSpeed 0.19.8's own estimate_zero2_model_states_mem_needs(total,
# gpus, nodes, cpu_offload=...) and estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes,
# cpu_offload=..., cpu_offload_params=False)[:2] returned for Qwen2.5-32B (32_763_876_352 parameters, a largest
# layer of 512_000_000); recorded from the installed package (deepspeed is not a test dependency: its sdist build
# pulls its own torch)
DEEPSPEED_ESTIMATES = {
    (8, 1, False): ((1572666064896, 139246474496), (24576000000, 75766721792)),
    (8, 1, True): ((1572666064896, 65527752704), (786333032448, 10238969088)),
    (8, 2, False): ((1572666064896, 102387113600), (24576000000, 38907360896)),
    (8, 2, True): ((3145332129792, 65527752704), (393166516224, 6143484544)),
    (4, 4, False): ((786333032448, 102387113600), (12288000000, 38907360896)),
    (4, 4, True): ((3145332129792, 65527752704), (196583258112, 6143484544)),
}


@pytest.mark.parametrize("gpus,nodes,offload", list(DEEPSPEED_ESTIMATES))
def test_deepspeed_estimate_is_deepspeed_own(gpus, nodes, offload):
    zero2, zero3 = DEEPSPEED_ESTIMATES[(gpus, nodes, offload)]
    total, largest = 32_763_876_352, 512_000_000
    assert zero.deepspeed_estimate(2, total, largest, gpus, nodes, offload) == pytest.approx(zero2, rel=1e-12)
    assert zero.deepspeed_estimate(3, total, largest, gpus, nodes, offload) == pytest.approx(zero3, rel=1e-12)


def test_planner_and_deepspeed_differ_by_the_terms_named():
    """Pure data parallel over 4 devices, every tensor sharded: MindSpore's stage 2 keeps 2P (bf16) + 16P/n where
    DeepSpeed estimates 2P + 18P/n (its 16-bit gradient partition beside the fp32 one); stage 3 16P/n + 6L where
    DeepSpeed has 18P/n + 4L (no persistent 16-bit partition; the gathered layer's gradient in fp32)."""
    n = 4
    P, L = _trainable_elements(TINY), _layer_elements(TINY)
    # the tiny tensors sit under the default 64 KB threshold; the comparison needs every one sharded
    inputs = PlanInputs("tiny", TINY, ParallelConfig(data_parallel=n, zero_stage=1, optimizer_shard_threshold_kb=0),
                        Workload(32, 1, 2), None, 1, 1)
    rows = {(c.zero_stage, c.offload_optimizer): c for c in zero_choices(inputs)}
    assert rows[(2, "none")].model_state_bytes == pytest.approx(2 * P + 16 * P / n)
    assert rows[(2, "none")].deepspeed_bytes == pytest.approx(2 * P + int(18 * P / n))
    assert rows[(3, "none")].model_state_bytes == pytest.approx(16 * P / n + 6 * L)
    assert rows[(3, "none")].deepspeed_bytes == pytest.approx(4 * L + int(18 * P / n))
    assert rows[(2, "host")].model_state_bytes == pytest.approx(2 * P + 8 * P / n)  # DeepSpeed: 2P, CPU Adam
    assert rows[(2, "host")].deepspeed_bytes == 2 * P
    report = compare_zero_report(inputs, 58, Offload())
    assert report.count("\n") == 10  # title, header, 8 rows, the note

"""LoRA against Hugging Face PEFT (the reference) on tiny Qwen2 / Qwen3, fp32, graph mode on CPU.

Tolerances: logits max|Δ| <= 5e-6 * max|reference logit| on non-padding positions (measured 8.9e-7); fp16 O2
against fp32 1e-2 * max (measured 1.1e-3); exact equality where the math is unchanged (B = 0, frozen weights).
"""
import json

import mindspore as ms
import numpy as np
import peft
import pytest
import torch
import transformers
from click.testing import CliRunner
from mindspore import nn

from ckpt_tools import cli as ckpt_cli
from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict
from mindspore_llm.lora import LoraConfig, LoraLinear, apply_lora, lora_layers
from mindspore_llm.models.auto import build_model, load_config
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.plan import apply_plan
from mindspore_llm.peft import ADAPTER_CONFIG, export_peft, load_peft_adapter, read_adapter
from mindspore_llm.train.optim import AdamW, OptimizerConfig
from mindspore_llm.train.schedule import ScheduleConfig
from mindspore_llm.train.step import PrecisionConfig, TrainStep
from tests import reference

BATCH, SEQ = 2, 10
LEFT_PAD = (0, 3)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = LoraConfig(rank=4, alpha=8.0, target_modules=ALL_PROJECTIONS)


def logits_of(model, batch):
    input_ids, mask, _ = batch
    return model(ms.Tensor(input_ids, ms.int32), ms.Tensor(mask, ms.int32)).asnumpy()


def torch_logits(model, batch):
    input_ids, mask, _ = batch
    with torch.no_grad():
        return model(torch.tensor(input_ids), attention_mask=torch.tensor(mask)).logits.numpy()


def assert_close(logits, ref, batch):
    valid = batch[1].astype(bool)
    error = np.abs(logits - ref)[valid].max()
    print(f"max|Δlogit| {error:.2e}, max|logit| {np.abs(ref[valid]).max():.3f}")
    assert error <= 5e-6 * np.abs(ref[valid]).max(), error


def snapshot(model):
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}


@pytest.fixture(scope="module")
def base_dir(module_dir):
    reference.qwen2(module_dir / "qwen2")
    return module_dir / "qwen2"


@pytest.fixture(scope="module")
def trained(base_dir):
    """Qwen2 with LoRA on every projection: logits before/after apply_lora, then after 5 Adam steps."""
    ms.set_seed(0)  # the adapters' initial A
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    batch = reference.random_batch(128, BATCH, SEQ, seed=1, left_pad=LEFT_PAD)
    before = logits_of(model, batch)
    apply_lora(model, CFG)
    fresh = logits_of(model, batch)
    initial = snapshot(model)
    optimizer = nn.Adam(model.trainable_params(), learning_rate=1e-2)
    ids, mask, labels = (ms.Tensor(a, ms.int32) for a in batch)

    def loss_fn(ids, labels, mask):
        return model.loss(ids, labels, mask)

    step = ms.value_and_grad(loss_fn, None, optimizer.parameters)
    losses = []
    for _ in range(5):
        loss, grads = step(ids, labels, mask)
        optimizer(grads)
        losses.append(float(loss.asnumpy()))
    return dict(base_dir=base_dir, model=model, batch=batch, before=before, fresh=fresh, initial=initial,
                final=snapshot(model), losses=losses, logits=logits_of(model, batch))


def test_fresh_adapter_leaves_logits_unchanged(trained):
    np.testing.assert_array_equal(trained["fresh"], trained["before"])


def test_only_adapters_are_trainable_and_named_like_peft(trained):
    model = trained["model"]
    names = sorted(p.name for p in model.trainable_params())
    assert len(names) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
    params = model.parameters_dict()
    assert params["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)  # the base name is unchanged
    assert params["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)  # (rank, in)
    assert params["model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)  # (out, rank)


def test_training_changes_only_adapter_weights(trained):
    initial, final = trained["initial"], trained["final"]
    assert trained["losses"][-1] < trained["losses"][0]
    for name, value in initial.items():
        if ".lora_" in name:
            assert not np.array_equal(final[name], value), name
        else:
            np.testing.assert_array_equal(final[name], value, err_msg=name)


def test_exported_adapter_gives_peft_the_same_logits(trained, module_dir):
    adapter_dir = module_dir / "adapter"
    export_peft(trained["model"], CFG, adapter_dir, base_model_name_or_path=str(trained["base_dir"]))
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == sorted(ALL_PROJECTIONS) and config["r"] == 4 and config["lora_alpha"] == 8.0
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(trained["base_dir"], attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    assert_close(trained["logits"], torch_logits(peft_model, trained["batch"]), trained["batch"])


def test_checkpoint_to_adapter_to_merged_model_by_cli(trained, module_dir):
    """msllm-ckpt export-peft (from a MindSpore .ckpt of the trained model), then merge-lora: transformers loads
    the merged directory with no missing key and gives our logits."""
    checkpoint = module_dir / "trained.ckpt"
    ms.save_checkpoint(trained["model"], str(checkpoint))
    adapter_dir, merged_dir = module_dir / "cli_adapter", module_dir / "merged"
    runner = CliRunner()
    result = runner.invoke(ckpt_cli.main, ["export-peft", str(checkpoint), str(adapter_dir), "--alpha", "8"])
    assert result.exit_code == 0, result.output
    cfg, tensors = read_adapter(adapter_dir)
    assert (cfg.rank, cfg.alpha, len(tensors)) == (4, 8.0, 28)
    result = runner.invoke(ckpt_cli.main, ["merge-lora", str(trained["base_dir"]), str(adapter_dir), str(merged_dir),
                                           "--quiet"])
    assert result.exit_code == 0, result.output
    merged, info = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager",
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_close(trained["logits"], torch_logits(merged.eval(), trained["batch"]), trained["batch"])


def test_merge_with_a_broken_adapter_is_a_clear_error(trained, module_dir):
    broken = module_dir / "broken_adapter"
    broken.mkdir()
    (broken / ADAPTER_CONFIG).write_text("{}")
    result = CliRunner().invoke(ckpt_cli.main, ["merge-lora", str(trained["base_dir"]), str(broken),
                                                str(module_dir / "never")])
    assert result.exit_code == 2 and "adapter_model.safetensors: missing" in result.output, result.output
    assert not (module_dir / "never").exists()


IMPORT_CASES = {
    # Qwen3 (tied head); "self_attn.o_proj" is PEFT's suffix form
    "qwen3": (reference.qwen3, ["q_proj", "v_proj", "self_attn.o_proj", "up_proj"]),
    # DeepSeek-V3 multi-head latent attention projections
    "deepseek_v3": (reference.deepseek_v3, ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
}


@pytest.mark.parametrize("family", sorted(IMPORT_CASES))
def test_peft_written_adapter_imports_with_peft_logits(module_dir, family):
    """An adapter that peft itself wrote, from a randomly initialised peft model (B != 0)."""
    build, targets = IMPORT_CASES[family]
    base_dir, adapter_dir = module_dir / family, module_dir / f"{family}_peft"
    hf_base = build(base_dir)
    torch.manual_seed(3)
    peft_cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False,
                               task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_base, peft_cfg).eval()
    peft_model.save_pretrained(adapter_dir)
    batch = reference.random_batch(hf_base.config.vocab_size, BATCH, SEQ, seed=2, left_pad=LEFT_PAD)

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = load_peft_adapter(model, adapter_dir)
    assert (cfg.rank, cfg.alpha) == (3, 5.0)
    assert len(lora_layers(model)) == len(targets) * hf_base.config.num_hidden_layers
    assert_close(logits_of(model, batch), torch_logits(peft_model, batch), batch)


def test_target_module_patterns():
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
             "model.layers.0.mlp.experts.3.down_proj"]

    def selected(*patterns):
        return [p for p in paths if LoraConfig(target_modules=list(patterns)).matches(p)]

    assert selected("q_proj") == paths[:2]  # a bare name matches the last component (PEFT's list form)
    assert selected("*.self_attn.*_proj") == paths[:2]
    assert selected("model.layers.1.*") == paths[1:3]
    assert selected("re:.*\\.layers\\.[01]\\.mlp\\.up_proj") == [paths[2]]
    assert selected("*.experts.*") == [paths[3]]


@pytest.mark.parametrize("fields, message", [
    (dict(rank=0), "rank"), (dict(alpha=-1), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(target_modules=[]), "target_modules"), (dict(target_modules=["re:("]), "target_modules[0]"),
])
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[")):
        from_dict(LoraConfig, fields, "train.yaml: lora")


def test_targets_matching_nothing_is_an_error(base_dir):
    model = build_model(load_config(base_dir))
    with pytest.raises(ConfigError, match="select no linear layer.*q_proj"):
        apply_lora(model, LoraConfig(target_modules=["query_key_value"]))


def test_plan_splits_adapters_like_their_base(base_dir):
    model = build_model(load_config(base_dir))
    apply_lora(model, LoraConfig(target_modules=["q_proj", "o_proj"], dropout=0.1))
    applied = {op.path: op.strategy for op in apply_plan(model, ParallelConfig(data_parallel=2, model_parallel=4))}
    layer = "model.layers.0.self_attn"
    # column-parallel q_proj: A whole, B split on its out dim like q_proj's weight
    assert applied[f"{layer}.q_proj.lora_A.matmul"] == ((2, 1), (1, 1))
    assert applied[f"{layer}.q_proj.lora_B.matmul"] == ((2, 1), (4, 1))
    assert applied[f"{layer}.q_proj.add"] == ((2, 4), (2, 4))
    # row-parallel o_proj: A split on its in dim like o_proj's weight, B whole
    assert applied[f"{layer}.o_proj.lora_A.matmul"] == ((2, 4), (1, 4))
    assert applied[f"{layer}.o_proj.lora_B.matmul"] == ((2, 1), (1, 1))
    assert applied[f"{layer}.o_proj.lora_dropout"] == ((2, 4),)


def test_o2_compute_dtype_trains_adapters(base_dir):
    """fp32 parameters, fp16 matmuls (O2): the LoRA model matches fp32 to fp16 accuracy and its step is finite."""
    fp32 = AutoModelForCausalLM.from_pretrained(base_dir)
    o2 = AutoModelForCausalLM.from_pretrained(base_dir, compute_dtype="fp16")
    for model in (fp32, o2):
        apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "down_proj"]))
        rng = np.random.default_rng(0)  # the same nonzero adapters in both
        for param in model.trainable_params():
            param.set_data(ms.Tensor(rng.normal(0, 0.1, param.shape).astype(np.float32)))
    batch = reference.random_batch(128, BATCH, SEQ, seed=1, left_pad=LEFT_PAD)
    ref = logits_of(fp32, batch)
    valid = batch[1].astype(bool)
    error = np.abs(logits_of(o2, batch) - ref)[valid].max()
    print(f"O2 vs fp32: max|Δlogit| {error:.2e}, max|logit| {np.abs(ref[valid]).max():.3f}")
    assert error <= 1e-2 * np.abs(ref[valid]).max()
    ids, mask, labels = (ms.Tensor(a, ms.int32) for a in batch)

    def loss_fn(ids, labels, mask):
        return o2.loss(ids, labels, mask)

    loss, grads = ms.value_and_grad(loss_fn, None, o2.trainable_params())(ids, labels, mask)
    assert np.isfinite(float(loss.asnumpy())) and all(np.isfinite(g.asnumpy()).all() for g in grads)
    assert isinstance(o2.model.layers[0].self_attn.q_proj, LoraLinear)


def test_train_step_with_o2_accumulation_and_dropout_updates_only_adapters(base_dir):
    """The project's TrainStep (fp16 matmuls, fixed loss scale, 2 micro-batches, AdamW) on a LoRA model with
    dropout in training mode: the loss falls, every base weight stays bitwise, every adapter moves."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, compute_dtype="fp16")
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.set_train(True)
    before = snapshot(model)
    optimizer = AdamW(model.trainable_params(), OptimizerConfig(),
                      ScheduleConfig(lr=1e-2, total_steps=10, decay="constant"))
    step = TrainStep(model, optimizer, PrecisionConfig(level="O2", compute_dtype="fp16", loss_scale="fixed",
                                                       initial_scale=1024.0), accumulation_steps=2)
    batch = reference.random_batch(128, 4, SEQ, seed=1, left_pad=(0, 3, 0, 2))
    ids, mask, labels = (ms.Tensor(a, ms.int32) for a in batch)
    losses = []
    for _ in range(4):
        loss, _, overflow, _ = step(ids, labels, mask)
        assert not overflow.asnumpy()
        losses.append(float(loss.asnumpy()))
    assert losses[-1] < losses[0]
    after = snapshot(model)
    for name, value in before.items():
        assert np.array_equal(after[name], value) != (".lora_" in name), name

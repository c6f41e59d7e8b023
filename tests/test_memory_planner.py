"""The memory planner and FLOPs accounting: parameter counts against built models and published totals, the
per-device estimate against a hand calculation, the shipped configs fitting under mindformers' 58 GB cap."""
import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from mindspore_llm.cli import main
from mindspore_llm.flops import flops_per_token, peak_tflops, throughput
from mindspore_llm.lora import LoraConfig, apply_lora, lora_parameter_shapes
from mindspore_llm.models.auto import build_model
from mindspore_llm.models.deepseek_v3 import DeepseekV3Config
from mindspore_llm.models.qwen import QwenConfig
from mindspore_llm.models.shapes import count_parameters, parameter_shapes
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.memory import GB, Workload, estimate_memory, plan_report
from mindspore_llm.train.config import load_plan_inputs

ROOT = Path(__file__).resolve().parents[1]
TINY_QWEN = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, qkv_bias=True)
TINY_DEEPSEEK = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                 num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                                 n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                                 first_k_dense_replace=1)


def trainable_shapes(model) -> dict:
    return {p.name: tuple(p.shape) for p in model.trainable_params()}


@pytest.mark.parametrize("config", [TINY_QWEN, TINY_DEEPSEEK,
                                    QwenConfig(architecture="Qwen3ForCausalLM", vocab_size=128, hidden_size=64,
                                               intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=24, qkv_bias=False, qk_norm=True,
                                               tie_word_embeddings=True)],
                         ids=["qwen2", "deepseek_v3", "qwen3"])
def test_parameter_shapes_equal_the_built_model(config):
    assert dict(parameter_shapes(config)) == trainable_shapes(build_model(config))


def test_lora_shapes_equal_the_adapted_model():
    lora = LoraConfig(rank=4, target_modules=["q_proj", "o_proj", "down_proj"])
    model = build_model(TINY_QWEN)
    apply_lora(model, lora)
    assert dict(lora_parameter_shapes(TINY_QWEN, lora)) == trainable_shapes(model)


def test_published_parameter_totals():
    qwen = QwenConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                      num_attention_heads=40, num_key_value_heads=8)
    total, active = count_parameters(qwen)
    embeddings = 2 * 152064 * 5120
    # Qwen2.5-32B model card: 32.5B parameters, 31.0B non-embedding (rounded figures)
    assert total == active == 32_763_876_352
    assert abs(total - 32.5e9) / 32.5e9 < 0.01 and abs(total - embeddings - 31.0e9) / 31.0e9 < 0.01
    deepseek = DeepseekV3Config(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                                num_hidden_layers=61, num_attention_heads=128)
    total, active = count_parameters(deepseek)
    # DeepSeek-V3 report: 671B total, 37B activated per token (the MTP module's 14B is not part of the main model)
    assert abs(total - 671e9) / 671e9 < 0.002 and abs(active - 37e9) / 37e9 < 0.02


def test_estimate_matches_a_hand_calculation():
    """dp 2 x mp 2 x pp 2, ZeRO-2 sharding every parameter (threshold 0), 4 micro-batches, recompute [full, none],
    seq 32, micro-batch 2, O2."""
    parallel = ParallelConfig(data_parallel=2, model_parallel=2, pipeline_stages=2, micro_batch_num=4,
                              zero_stage=2, optimizer_shard_threshold_kb=0, recompute=["full", "none"])
    stages = estimate_memory(TINY_QWEN, parallel, Workload(32, 2, 2))
    # Parameters per device. A layer: q 64x64+64, k 32x64+32, v 32x64+32, o 64x64, gate/up/down 3 x 128x64 all
    # split by mp 2; two norms of 64 replicated.
    layer = (4096 + 64 + 2048 + 32 + 2048 + 32 + 4096 + 3 * 8192) // 2 + 128  # 18624
    stage0 = 2 * layer + 256 * 64 // 2  # + the embedding, vocab-parallel: 45440
    stage1 = 2 * layer + 64 + 256 * 64 // 2  # + final norm + LM head: 45504
    # bytes per element: bf16 copy 2, fp32 weight 4/dp, fp32 gradient 4/dp, AdamW moments 8/dp
    per_element = {"compute weights": 2, "fp32 weights": 2, "gradients": 2, "optimizer states": 4}
    # Activations, tokens = 32 x 2 = 64, bf16 (e = 2), t = 2, no sequence parallel:
    #   norms/inputs 4*e*64*64 = 32768; Q,K,V,o_proj input e*64*(2*64 + 2*32)/2 = 12288;
    #   core (4+e)*heads*s^2*b/t = 6*4*32*32*2/2 = 24576; SwiGLU 4*e*64*128/2 = 32768
    no_recompute = 32768 + 12288 + 24576 + 32768  # 102400
    full = 2 * 64 * 64  # the layer input only: 8192
    mask = 4 * 2 * 32 * 32  # the fp32 attention bias of a micro-batch: 8192
    expected0 = {**{k: v * stage0 for k, v in per_element.items()},
                 "activations": 2 * (2 * full + mask),  # 2 micro-batches in flight on the first of 2 stages
                 "recompute working set": no_recompute - full, "logits and loss": 0}
    expected1 = {**{k: v * stage1 for k, v in per_element.items()},
                 "activations": 1 * (2 * no_recompute + mask), "recompute working set": 0,
                 "logits and loss": 64 * 256 // 2 * (2 + 12)}  # bf16 logits + three fp32 tensors, vocab split
    assert stages[0].terms == pytest.approx(expected0, rel=1e-12)
    assert stages[1].terms == pytest.approx(expected1, rel=1e-12)
    assert (stages[0].total, stages[1].total) == (597760, 782720)
    assert stages[0].parameters == stage0 and stages[1].parameters == stage1


def test_sequence_parallel_and_selective_recompute_shrink_activations():
    work = Workload(4096, 1, 2)
    base = ParallelConfig(model_parallel=8, recompute="none")
    variants = {"none": base, "sp": ParallelConfig(model_parallel=8, sequence_parallel=True),
                "selective": ParallelConfig(model_parallel=8, recompute="selective"),
                "full": ParallelConfig(model_parallel=8, recompute="full", sequence_parallel=True)}
    qwen = QwenConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                      num_attention_heads=40, num_key_value_heads=8)
    act = {k: estimate_memory(qwen, p, work)[0].terms["activations"] for k, p in variants.items()}
    s, h, t, layers, mask = 4096, 5120, 8, 64, 4 * 4096 ** 2
    # sequence parallel divides the 4*e*s*b*h of norms and block inputs by t
    assert act["none"] - act["sp"] == pytest.approx(layers * 4 * 2 * s * h * (1 - 1 / t))
    # selective drops the core attention's (4 + e) * a * s^2 * b / t
    assert act["none"] - act["selective"] == pytest.approx(layers * 6 * 40 * s * s / t)
    assert act["full"] == pytest.approx(layers * 2 * s * h / t + mask)


def test_lora_base_is_frozen():
    parallel = ParallelConfig(model_parallel=2)
    lora = LoraConfig(rank=4, target_modules=["q_proj", "v_proj"])
    full = estimate_memory(TINY_QWEN, parallel, Workload(32, 1, 2))[0].terms
    adapted = estimate_memory(TINY_QWEN, parallel, Workload(32, 1, 2), lora)[0].terms
    # adapters per layer: q: A 4x64 (replicated), B 64x4 (split); v: A 4x64, B 32x4 (split)
    adapters = 4 * (256 + 256 // 2 + 256 + 128 // 2)
    assert adapted["gradients"] == 4 * adapters and adapted["optimizer states"] == 8 * adapters
    assert adapted["fp32 weights"] == full["fp32 weights"] + 4 * adapters  # frozen base still fp32, unsharded


@pytest.mark.parametrize("name, devices", [("qwen2_5_32b_sft_8k_16p.yaml", 16), ("qwen2_5_32b_lora_8k_16p.yaml", 16),
                                           ("deepseek_v3_671b_pretrain_4k_2048p.yaml", 2048)])
def test_shipped_configs_fit_under_58_gb(name, devices):
    inputs = load_plan_inputs(ROOT / "configs" / name)
    stages = estimate_memory(inputs.model, inputs.parallel, inputs.work, inputs.lora, inputs.distill,
                             inputs.teacher)
    assert max(s.total for s in stages) < 58 * GB
    text, fits = plan_report(inputs, devices, 58)
    assert fits and "-> fits; dominant term:" in text


@pytest.mark.parametrize("name", ["qwen2_5_32b_sft_8k_16p.yaml", "qwen2_5_32b_lora_8k_16p.yaml",
                                  "deepseek_v3_671b_pretrain_4k_2048p.yaml"])
def test_shipped_configs_are_training_configs(name):
    """What `msllm train` (and so scripts/run_distribute.sh) reads: the same file the planner reads."""
    from mindspore_llm.train.config import load_train_config

    config = load_train_config(ROOT / "configs" / name)
    assert config.parallel == load_plan_inputs(ROOT / "configs" / name).parallel
    assert config.device_target == "Ascend"


def test_full_sft_32b_numbers():
    """The 32B recipe: tp 8 x pp 2, 2.05B parameters per device at 16 bytes each + the bf16 copy."""
    inputs = load_plan_inputs(ROOT / "configs" / "qwen2_5_32b_sft_8k_16p.yaml")
    stages = estimate_memory(inputs.model, inputs.parallel, inputs.work)
    per_device = stages[1].parameters
    embedding = 152064 * 5120  # the last stage: half the layers split 8 ways, the LM head split 8 ways
    assert per_device == pytest.approx((32_763_876_352 - 2 * embedding) / 16 + embedding / 8, rel=1e-3)
    assert stages[1].terms["optimizer states"] == 8 * per_device
    assert stages[1].dominant == "optimizer states"
    # no recompute: flash attention (the config's Ascend kernels) stores no S x S scores, and the plan fits; the
    # decomposed attention's scores would not
    assert inputs.work.flash_attention and inputs.parallel.recompute == "none"
    assert max(s.total for s in stages) <= 58 * GB
    decomposed = dataclasses.replace(inputs.work, flash_attention=False)
    assert max(s.total for s in estimate_memory(inputs.model, inputs.parallel, decomposed)) > 58 * GB


def test_host_memory_per_process_while_loading():
    """Per-rank loading holds this rank's slices (fp32) + the largest slice once more + one 64 MB window; loading
    every full tensor held the whole model in fp32 on every process (DeepSeek-V3: plus one projection's experts
    buffered, then stacked)."""
    from mindspore_llm.parallel.memory import host_load_bytes

    inputs = load_plan_inputs(ROOT / "configs" / "qwen2_5_32b_sft_8k_16p.yaml")
    stages = estimate_memory(inputs.model, inputs.parallel, inputs.work)
    after, before = host_load_bytes(inputs.model, inputs.parallel, stages)
    embedding_slice = 152064 * 5120 / 8  # the largest slice: the vocabulary-parallel embedding / LM head
    assert after == 4 * stages[1].parameters + 4 * embedding_slice + 64 * 2 ** 20
    assert before == 4 * 32_763_876_352  # 131 GB on each of the 16 processes
    assert after / GB == pytest.approx(8.05, abs=0.01)
    inputs = load_plan_inputs(ROOT / "configs" / "deepseek_v3_671b_pretrain_4k_2048p.yaml")
    stages = estimate_memory(inputs.model, inputs.parallel, inputs.work)
    _, before = host_load_bytes(inputs.model, inputs.parallel, stages)
    total, _ = count_parameters(inputs.model)
    assert before == 4 * total + 2 * 4 * 256 * 2048 * 7168


def test_plan_cli(tmp_path):
    result = CliRunner().invoke(main, ["plan", str(ROOT / "configs" / "qwen2_5_32b_sft_8k_16p.yaml"),
                                       "--device-num", "16", "--hbm-gb", "58"])
    assert result.exit_code == 0, result.output
    assert "device mesh: 16 devices = data_parallel 1 x model_parallel 8 x pipeline_stages 2" in result.output
    assert "model.layers.0.self_attn.q_proj.matmul" in result.output
    assert "model.layers.1." not in result.output  # one layer shown
    assert "kernels: fused flash_attention" in result.output
    assert "self_attn.attention.flash_attention" in result.output
    assert "peak: stage 0, 51.99 GB of 58 GB -> fits; dominant term: activations" in result.output
    assert "host memory per process while loading weights: 8.05 GB" in result.output
    tight = CliRunner().invoke(main, ["plan", str(ROOT / "configs" / "qwen2_5_32b_sft_8k_16p.yaml"),
                                      "--device-num", "16", "--hbm-gb", "20"])
    assert tight.exit_code == 1 and "DOES NOT FIT" in tight.output
    wrong = CliRunner().invoke(main, ["plan", str(ROOT / "configs" / "qwen2_5_32b_sft_8k_16p.yaml"),
                                      "--device-num", "8"])
    assert wrong.exit_code == 2 and "= 16 devices, but the job has 8" in wrong.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  architecture: Qwen2ForCausalLM\n  vocab_size: 128\n  hidden_size: 64\n"
                   "  intermediate_size: 96\n  num_hidden_layers: 2\n  num_attention_heads: 4\n"
                   "  num_key_value_heads: 2\ndata:\n  kind: sft\n  path: x.jsonl\n  tokenizer: tok\n  seq_length: 64\n"
                   "parallel:\n  model_paralel: 2\n")
    result = CliRunner().invoke(main, ["plan", str(bad), "--device-num", "2"])
    assert result.exit_code == 2 and "parallel: unknown key(s) model_paralel" in result.output


def test_offline_distillation_adds_the_stored_top_k():
    parallel = ParallelConfig(model_parallel=2)
    from mindspore_llm.distill import DistillConfig

    distill = DistillConfig(mode="offline", teacher_logits="t.bin", top_k=16)
    terms = estimate_memory(TINY_QWEN, parallel, Workload(32, 2, 2), distill=distill)[0].terms
    assert terms["teacher"] == 32 * 2 * 16 * 8  # fp32 values + int32 indices per kept logit


def test_flops_per_token_and_mfu():
    config = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, qkv_bias=False)
    # matmul weights a token passes: per layer q 64x64, k,v 32x64, o 64x64, gate/up/down 3 x 128x64; LM head
    n = 2 * (4096 + 2 * 2048 + 4096 + 3 * 8192) + 256 * 64
    assert flops_per_token(config, 512) == 6 * n + 12 * 2 * 64 * 512
    result = throughput(config, 512, 1000.0, "910B")
    assert result["model_tflops_per_device"] == pytest.approx(1000.0 * (6 * n + 12 * 2 * 64 * 512) / 1e12)
    assert result["mfu"] == pytest.approx(result["model_tflops_per_device"] / 313.0)
    assert peak_tflops(400) == 400.0
    deepseek = DeepseekV3Config(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                                num_hidden_layers=61, num_attention_heads=128)
    norms = 61 * (2 * 7168 + 1536 + 512) + 7168  # per layer: two hidden norms, the q and kv latent norms
    active = count_parameters(deepseek)[1] - 129280 * 7168 - norms  # the input embedding is a lookup
    assert flops_per_token(deepseek, 4096) == 6 * active + 12 * 61 * 7168 * 4096
    with pytest.raises(ValueError, match="unknown device type"):
        peak_tflops("910X")


def test_online_teacher_from_a_training_yaml(tmp_path):
    """A distill section naming a teacher directory: the teacher is TINY_QWEN's shape, on mp 2 like the student."""
    import json

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}))
    yaml_path = tmp_path / "kd.yaml"
    yaml_path.write_text(
        "model:\n  architecture: Qwen2ForCausalLM\n  vocab_size: 256\n  hidden_size: 64\n  intermediate_size: 128\n"
        "  num_hidden_layers: 4\n  num_attention_heads: 4\n  num_key_value_heads: 2\n"
        "data:\n  kind: sft\n  path: not_read.jsonl\n  tokenizer: teacher\n  seq_length: 32\n"
        "train:\n  micro_batch_size: 2\n  steps: 10\n"
        "precision:\n  level: O2\n  compute_dtype: bf16\n"
        "parallel:\n  model_parallel: 2\n"
        "distill:\n  teacher: teacher\n  temperature: 2.0\n")
    inputs = load_plan_inputs(yaml_path)
    stages = estimate_memory(inputs.model, inputs.parallel, inputs.work, inputs.lora, inputs.distill,
                             inputs.teacher)
    # weights: (4 + 2) bytes x (4 layers x 18624 + embedding 8192 + norm 64 + LM head 8192) elements per device;
    # one layer's forward activations (102400, as in the hand calculation); fp32 logits 64 x 128 x 14
    assert stages[0].terms["teacher"] == 6 * (4 * 18624 + 8192 + 64 + 8192) + 102400 + 64 * 128 * 14
    text, _ = plan_report(inputs, 2, 64)
    assert "distill: online teacher Qwen2ForCausalLM" in text and "teacher" in text.split("memory per device")[1]

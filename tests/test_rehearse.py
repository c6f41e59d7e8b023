"""`msllm rehearse`: every shipped config's training step, built as the trainer builds it for the cluster (pipeline,
pipeline gradient reducer, optimizer-shard flag, stages, recompute, LoRA, distillation), runs at toy size and
computes what the same toy model computes without the wrappers.

Reference: the same weights trained stand-alone, no plan, one step on the whole batch (TrainStep, itself checked
against PyTorch in test_train_step.py). Tolerances in rehearse.TOLERANCE (fp32: loss and grad norm 1e-5 relative,
moments 1e-4 of their tensor's largest value; measured: at most 1e-7, 1e-7 and 6e-6). The directory is listed, so a
config added to configs/ is rehearsed too.
"""
from pathlib import Path

import pytest
from click.testing import CliRunner

from mindspore_llm.cli import main as cli_main
from mindspore_llm.parallel import context as context_module
from mindspore_llm.train import step as step_module
from mindspore_llm.train.assembly import build_toy_model, toy_model_config
from mindspore_llm.train.config import load_train_config
from mindspore_llm.train.rehearse import rehearse

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SFT_32B = ROOT / "configs" / "qwen2_5_32b_sft_8k_16p.yaml"


# configs whose model.path is another shipped config's output: rehearsed on a random model of that config's shape
STARTS_FROM = {"tiny_qwen_grpo.yaml": "tiny_qwen_sft.yaml"}


def starting_model(name: str, directory: Path) -> list[str]:
    """The overrides that point `name`'s model.path at a random model of its starting config's shape."""
    if name not in STARTS_FROM:
        return []
    from mindspore_llm.models.auto import build_model
    from mindspore_llm.train import checkpointing

    model_config = load_train_config(ROOT / "configs" / STARTS_FROM[name]).model_config()
    checkpointing.save_model_directory(build_model(model_config), model_config, directory)
    return [f"model.path={directory}"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_rehearses(path, tmp_path):
    config = load_train_config(path, starting_model(path.name, tmp_path / "start"))
    result = rehearse(config, str(path), steps=2, echo=lambda line: None)
    report = "\n".join(result.lines)
    assert result.ok, report
    assert sum(line.startswith("  step ") for line in result.lines) == 2, report
    if config.parallel.pipeline_stages > 1:
        assert f"PipelineGradReducer(opt_shard={config.parallel.optimizer_shard})" in report
        assert "compiled as AutoParallel" in report
    if config.lora is not None and config.lora.dropout > 0:
        assert "LoRA dropout" in report
    assert f"zero_stage {config.parallel.zero_stage}" in report
    if config.parallel.offloads_optimizer:  # every moment of the toy model on the host
        moments = 2 * len(build_toy_model(toy_model_config(config.model_config(), config.parallel),
                                          config.parallel, config.precision.model_precision())[0].trainable_params())
        assert f"{moments} of {moments} AdamW moments placed on the host" in report
    if config.device_target == "Ascend":  # the kernels a cluster run uses, their training graph constructed here
        assert "    flash_attention: FlashAttentionScore" in report and "FlashAttentionScoreGrad" in report
        assert "    adamw: decomposed" in report  # the cluster's optimizer is the one compiled and run here
    else:
        assert "    flash_attention: decomposed" in report and "fused graph" not in report
        assert "    adamw: AdamWeightDecay kernels" in report
    if config.kind == "grpo":
        assert "GRPOStep on rollouts" in report


def test_rehearsal_fails_on_the_pipeline_arity_error(monkeypatch):
    """With the fix reverted (the pipeline differentiated directly), the 32B job's step does not compile:
    exit 1 with MindSpore's message."""
    monkeypatch.setattr(step_module, "_Differentiated", lambda loss: loss)
    result = CliRunner().invoke(cli_main, ["rehearse", str(SFT_32B), "--steps", "1"])
    assert result.exit_code == 1, result.output
    assert "rehearsal FAILED" in result.output and "parameters number of the function is 2" in result.output


def test_rehearsal_reports_a_wiring_mismatch(monkeypatch):
    """A reducer that loses half of every gradient (only the wrapped step has one): exit 1, named."""
    monkeypatch.setattr(context_module, "pipeline_grad_reducer", lambda parameters, opt_shard: (
        context_module.PipelineGradReducer(parameters, scale_sense=2.0, opt_shard=opt_shard)))
    result = CliRunner().invoke(cli_main, ["rehearse", str(SFT_32B), "--steps", "1"])
    assert result.exit_code == 1, result.output
    assert "MISMATCH" in result.output and "grad_norm differs" in result.output


def test_rehearsal_without_optimizer_shard_compares_the_pipeline_gradients():
    """optimizer_shard false: the reducer reads buffers only MindSpore's pipeline pass fills on the cluster, so the
    rehearsal compares the pipeline's own gradients and the first step's loss."""
    config = load_train_config(SFT_32B, ["parallel.zero_stage=0"])
    result = rehearse(config, str(SFT_32B), steps=1, echo=lambda line: None)
    report = "\n".join(result.lines)
    assert result.ok, report
    assert "PipelineGradReducer(opt_shard=False)" in report and "the pipeline's own gradients" in report

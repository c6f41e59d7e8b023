"""mindspore_llm: train, fine-tune and convert Qwen and DeepSeek models with MindSpore on Ascend (and CPU)."""

__version__ = "0.1.0"
__all__ = ["AutoModelForCausalLM", "build_model", "load_config", "__version__"]


def __getattr__(name):
    # loaded on first use: importing the package (the `msllm` command) must not start MindSpore, whose logging
    # and simulation settings are environment variables read when it starts
    if name in ("AutoModelForCausalLM", "build_model", "load_config"):
        from mindspore_llm.models import auto

        return getattr(auto, name)
    raise AttributeError(f"module 'mindspore_llm' has no attribute {name!r}")

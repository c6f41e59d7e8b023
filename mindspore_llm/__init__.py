"""mindspore_llm: train, fine-tune and convert Qwen and DeepSeek models with MindSpore on Ascend (and CPU)."""
from mindspore_llm.models.auto import AutoModelForCausalLM, build_model, load_config

__version__ = "0.1.0"
__all__ = ["AutoModelForCausalLM", "build_model", "load_config", "__version__"]

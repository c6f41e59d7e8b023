"""Checkpoint conversion between Hugging Face safetensors and MindSpore (``msllm-ckpt``)."""

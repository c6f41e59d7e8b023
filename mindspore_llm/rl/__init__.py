"""Reinforcement learning: GRPO's rewards, advantages and loss, the prompts it samples from, and evaluation
(docs/grpo.md). The training loop that runs them is ``mindspore_llm.train.grpo``."""

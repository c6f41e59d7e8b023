"""Training: the optimizer, the learning-rate schedule and the compiled training step (the trainer, its config,
checkpointing and data live beside them)."""
from mindspore_llm.train.optim import AdamW, OptimizerConfig, param_groups
from mindspore_llm.train.schedule import LearningRate, ScheduleConfig, learning_rate
from mindspore_llm.train.step import PrecisionConfig, TrainStep

__all__ = ["AdamW", "OptimizerConfig", "param_groups", "LearningRate", "ScheduleConfig", "learning_rate",
           "PrecisionConfig", "TrainStep"]

"""Training data: pretraining text and SFT conversations -> fixed-length token sequences (docs/data.md)."""
from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.data.config import TINY_ASSETS, DataConfig, DataError, load_data_config
from mindspore_llm.data.dataset import TokenDataset, build_dataset, build_sequences, shard_indices
from mindspore_llm.data.formats import encode_conversation, to_messages
from mindspore_llm.data.mindrecord import write_mindrecord

__all__ = ["DataConfig", "DataError", "IGNORE_INDEX", "TINY_ASSETS", "TokenDataset", "build_dataset",
           "build_sequences", "encode_conversation", "load_data_config", "shard_indices", "to_messages",
           "write_mindrecord"]

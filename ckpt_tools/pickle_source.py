"""``pytorch_model.bin`` (a pickle) as a tensor source, only with ``--allow-pickle``; needs torch."""
from __future__ import annotations

from pathlib import Path
import numpy as np

from mindspore_llm.checkpoint import TensorFile
from mindspore_llm.common import CheckpointError

_TAGS = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
         "torch.float8_e4m3fn": "F8_E4M3", "torch.int64": "I64", "torch.int32": "I32"}


class TorchPickleFile(TensorFile):
    def __init__(self, path: Path):
        import torch

        self.path = Path(path)
        try:
            # weights_only refuses arbitrary objects; mmap keeps the tensors on disk until they are read.
            self.state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{self.path}: cannot be read with torch.load(weights_only=True) ({err})") from None
        self.tensors = {}
        for name, tensor in self.state.items():
            if str(tensor.dtype) not in _TAGS:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {tensor.dtype}")
            self.tensors[name] = {"dtype": _TAGS[str(tensor.dtype)], "shape": list(tensor.shape), "segments": []}

    def nbytes(self, name: str) -> int:
        tensor = self.state[name]
        return tensor.numel() * tensor.element_size()

    def raw(self, name: str) -> np.ndarray:
        import torch

        tensor = self.state[name].contiguous()
        bits = {2: torch.int16, 1: torch.uint8}
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn):
            tensor = tensor.view(bits[tensor.element_size()])
        array = tensor.numpy()
        return array.view(np.uint16) if array.dtype == np.int16 else array

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.raw(name)[start:stop]

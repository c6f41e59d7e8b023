"""Greedy decoding for checking a model end to end (not a serving engine: no KV cache).

The sequence lives in one fixed-length buffer (prompt + new tokens), so the graph compiles once; the causal mask
keeps the not-yet-written tail from influencing earlier positions.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np


def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                    pad_token_id: int = 0) -> list[int]:
    """The new token ids (without the prompt), stopping after an end-of-sequence token."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    model.set_train(False)  # evaluation mode: no dropout, whatever mode a training run left the model in
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    length = len(prompt_ids) + max_new_tokens
    buffer = np.full((1, length), pad_token_id, np.int32)
    buffer[0, :len(prompt_ids)] = prompt_ids
    generated = []
    for position in range(len(prompt_ids), length):
        logits = model(ms.Tensor(buffer)).asnumpy()
        token = int(logits[0, position - 1].argmax())
        buffer[0, position] = token
        generated.append(token)
        if token in stops:
            break
    return generated

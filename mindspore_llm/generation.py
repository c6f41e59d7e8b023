"""Batched generation with a key/value cache: greedy or sampled (temperature, top-k, top-p), per-row stop tokens.

Static shapes, so each of the two graphs compiles once per generator: the B rows are left-padded to P prompt slots,
and every layer caches L = P + max_new_tokens - 1 slots (the prompt, and each generated token but the last).

    prefill   the prompts (B, P) -> the first new token of every row; writes slots 0 .. P-1
    decode    one token per row (B, 1) at slot P + t -> the next token; writes slot P + t

Both graphs end in ``TokenSampler``, so only B token ids and B log-probabilities leave the graph per step. Sampling
draws one uniform number per row and step on the host (NumPy, from ``seed``) and inverts the cumulative
distribution in the graph: the same seed gives the same tokens, on any device, without any RNG state in the graph.
Rows stop independently at any of the stop ids; the loop ends when every row has stopped or the budget is spent.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from mindspore_llm.config_utils import read_text, require


@dataclass(frozen=True)
class GenerationConfig:
    """Hugging Face's ``generate`` names. ``temperature`` 0 decodes greedily; above 0 it samples from
    softmax(logits / temperature), restricted to the ``top_k`` most likely tokens (0: all) and then to the
    smallest set whose probability reaches ``top_p`` (1: all), in transformers' warper order."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: tuple[int, ...] = ()  # a row stops after generating any of these
    pad_token_id: int = 0  # fills the prompt padding and a stopped row's remaining slots

    def validate(self) -> None:
        require(self.max_new_tokens >= 1, f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        require(self.temperature >= 0, f"temperature: must be >= 0 (0: greedy), got {self.temperature}")
        require(self.top_k >= 0, f"top_k: must be >= 0 (0: no top-k filter), got {self.top_k}")
        require(0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


class TokenSampler(nn.Cell):
    """``(logits (B, V), uniform (B,)) -> (token ids (B,) int32, their log-probabilities (B,) fp32)``.

    The log-probability is that of the unfiltered distribution softmax(logits / temperature) (of softmax(logits)
    when greedy): what a forward pass of the finished sequence gives, so training can use it as the rollout's
    log-probability. Sampling keeps the candidates sorted by probability (top-k, or every token when only top-p
    filters), renormalises, cuts at top-p, and picks the first candidate whose cumulative probability exceeds
    uniform x total: an exact draw from the filtered distribution.
    """

    def __init__(self, config: GenerationConfig, vocab_size: int):
        super().__init__()
        self.greedy = not config.do_sample
        self.temperature = config.temperature if config.do_sample else 1.0
        self.candidates = min(config.top_k or vocab_size, vocab_size)
        self.sorted = config.top_k > 0 or config.top_p < 1
        self.top_p = config.top_p

    def construct(self, logits, uniform):
        scaled = logits / self.temperature
        log_probs = ops.log_softmax(scaled, -1)
        if self.greedy:
            tokens = ops.argmax(scaled, -1).astype(ms.int32)
        else:
            if self.sorted:
                values, candidates = ops.topk(scaled, self.candidates)
            else:  # no filter: the vocabulary order is as good a CDF order as any, and needs no sort
                values, candidates = scaled, ops.broadcast_to(ops.arange(scaled.shape[-1], dtype=ms.int32),
                                                              scaled.shape)
            probs = ops.softmax(values, -1)
            if self.top_p < 1:
                before = ops.cumsum(probs, -1) - probs  # mass of the more likely candidates
                probs = probs * (before < self.top_p).astype(probs.dtype)  # the first candidate always stays
            cdf = ops.cumsum(probs, -1)
            threshold = (uniform * cdf[:, -1]).reshape(-1, 1)
            kept = (probs > 0).astype(ms.int32).sum(-1, keepdims=True)
            rank = ops.minimum((cdf <= threshold).astype(ms.int32).sum(-1, keepdims=True), kept - 1)
            tokens = ops.gather_elements(candidates.astype(ms.int32), 1, rank).reshape(-1)
        picked = ops.gather_elements(log_probs, 1, tokens.reshape(-1, 1)).reshape(-1)
        return tokens, picked


class _Prefill(nn.Cell):
    """Prompts -> the first new token per row, and the caches holding the prompts' keys and values."""

    def __init__(self, model, sampler: TokenSampler, cache_shapes, cache_dtype):
        super().__init__(auto_prefix=False)
        self.model = model
        self.sampler = sampler
        self.cache_shapes = tuple(tuple(shapes) for shapes in cache_shapes)
        self.cache_dtype = cache_dtype

    def construct(self, input_ids, position_ids, key_mask, uniform):
        caches = tuple(tuple(ops.zeros(shape, self.cache_dtype) for shape in layer) for layer in self.cache_shapes)
        logits, caches = self.model.construct_cached(input_ids, position_ids, key_mask,
                                                     ops.zeros((), ms.int32), caches)
        tokens, log_probs = self.sampler(logits[:, 0], uniform)
        return tokens, log_probs, caches


class _Decode(nn.Cell):
    """One token per row at cache slot `start` -> the next token per row, and the caches with it written in."""

    def __init__(self, model, sampler: TokenSampler):
        super().__init__(auto_prefix=False)
        self.model = model
        self.sampler = sampler

    def construct(self, tokens, positions, key_mask, start, uniform, caches):
        logits, caches = self.model.construct_cached(tokens.reshape(-1, 1), positions.reshape(-1, 1), key_mask,
                                                     start, caches)
        tokens, log_probs = self.sampler(logits[:, 0], uniform)
        return tokens, log_probs, caches


@dataclass
class Generation:
    """What one ``generate`` call produced, row by row (the rows of the prompts given, in order).

    ``prompt_ids``/``prompt_mask`` are the left-padded prompts (B, P) as the model saw them; ``tokens`` (B, C)
    the new tokens, ``pad_token_id`` after a row's stop token; ``log_probs`` (B, C) each new token's
    log-probability (0 after the stop); ``lengths`` the new tokens per row, its stop token included."""

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    log_probs: np.ndarray
    lengths: np.ndarray
    seconds: float = 0.0

    @property
    def completion_mask(self) -> np.ndarray:
        return (np.arange(self.tokens.shape[1]) < self.lengths[:, None]).astype(np.int32)

    def completions(self) -> list[list[int]]:
        return [row[:length].tolist() for row, length in zip(self.tokens, self.lengths)]

    @classmethod
    def concatenate(cls, parts: Sequence["Generation"]) -> "Generation":
        arrays = (np.concatenate([getattr(part, name) for part in parts])
                  for name in ("prompt_ids", "prompt_mask", "tokens", "log_probs", "lengths"))
        return cls(*arrays, seconds=sum(part.seconds for part in parts))


def stop_token_ids(model_config, tokenizer=None, model_dir: str | Path | None = None) -> tuple[int, ...]:
    """The ids that end a row: the model config's ``eos_token_id`` (one or a list), those of the model directory's
    ``generation_config.json`` (chat models list their end-of-turn token there) and the tokenizer's eos token."""
    ids = []
    sources = [model_config.eos_token_id, tokenizer.eos_token_id if tokenizer is not None else None]
    generation_config = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if generation_config is not None and generation_config.is_file():
        sources.append(json.loads(read_text(generation_config)).get("eos_token_id"))
    for source in sources:
        for token in source if isinstance(source, list) else [source]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return tuple(ids)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, 0/1 mask), both (len(prompts), length) int32, each prompt right-aligned."""
    ids = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, length - len(prompt):] = prompt
            mask[row, length - len(prompt):] = 1
    return ids, mask


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Positions counted over the real tokens of each row (padding gets 0 and is never attended to), as
    transformers derives them from the attention mask in ``generate``."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


class Generator:
    """``Generator(model, config, batch_size, max_prompt_length).generate(prompts, seed) -> Generation``.

    Up to `batch_size` prompts (lists of token ids, at most `max_prompt_length` each) per call; fewer are padded
    with copies of the last so the compiled shapes never change. The model is any ``CausalLM`` whose attention
    implements ``construct_cached`` (Qwen2/2.5/3 keys and values, DeepSeek-V3 the MLA latent); it runs in
    inference mode (``set_train(False)``: no dropout) for the call."""

    def __init__(self, model, config: GenerationConfig, batch_size: int, max_prompt_length: int):
        config.validate()
        require(batch_size >= 1, f"batch_size: must be >= 1, got {batch_size}")
        require(max_prompt_length >= 1, f"max_prompt_length: must be >= 1, got {max_prompt_length}")
        self.model = model
        self.config = config
        self.batch_size = batch_size
        self.prompt_length = max_prompt_length
        self.cache_length = max_prompt_length + config.max_new_tokens - 1
        sampler = TokenSampler(config, model.config.vocab_size)
        shapes = model.cache_shapes(batch_size, self.cache_length)
        self.prefill = _Prefill(model, sampler, shapes, model.precision.activations)
        self.decode = _Decode(model, sampler)

    def generate(self, prompts: Sequence[Sequence[int]], seed: int | Sequence[int] | None = 0) -> Generation:
        import time

        count = len(prompts)
        require(0 < count <= self.batch_size, f"generate: 1 to {self.batch_size} prompts per call, got {count}")
        for index, prompt in enumerate(prompts):
            require(0 < len(prompt) <= self.prompt_length,
                    f"prompt {index}: {len(prompt)} tokens; prompts must hold 1 to {self.prompt_length} tokens")
        rows = list(prompts) + [prompts[-1]] * (self.batch_size - count)
        cfg, rng = self.config, np.random.default_rng(seed)
        ids, mask = left_pad(rows, self.prompt_length, cfg.pad_token_id)
        key_mask = ms.Tensor(np.concatenate([mask, np.ones((len(rows), self.cache_length - self.prompt_length),
                                                           np.int32)], axis=1))
        started = time.perf_counter()
        self.prefill.set_train(False)
        self.decode.set_train(False)
        tokens, log_probs, caches = self.prefill(ms.Tensor(ids), ms.Tensor(position_ids(mask)), key_mask,
                                                 ms.Tensor(rng.random(len(rows), dtype=np.float32)))
        new_tokens = np.full((len(rows), cfg.max_new_tokens), cfg.pad_token_id, np.int32)
        new_log_probs = np.zeros((len(rows), cfg.max_new_tokens), np.float32)
        lengths = np.zeros(len(rows), np.int64)
        done = np.zeros(len(rows), bool)
        stops = np.array(cfg.eos_token_id, np.int64)
        positions = mask.sum(1).astype(np.int32)  # of the first new token: the row's prompt length
        step = 0
        while True:
            token_array, alive = tokens.asnumpy(), ~done
            new_tokens[alive, step] = token_array[alive]
            new_log_probs[alive, step] = log_probs.asnumpy()[alive]
            lengths[alive] += 1
            done |= alive & np.isin(token_array, stops)
            step += 1
            if step == cfg.max_new_tokens or done[:count].all():
                break
            tokens, log_probs, caches = self.decode(
                ms.Tensor(token_array), ms.Tensor(positions + step - 1), key_mask,
                ms.Tensor(self.prompt_length + step - 1, ms.int32),
                ms.Tensor(rng.random(len(rows), dtype=np.float32)), ms.mutable(caches))  # an input, not a constant
        return Generation(ids[:count], mask[:count], new_tokens[:count], new_log_probs[:count], lengths[:count],
                          time.perf_counter() - started)


def decode_completions(tokenizer, generation: Generation, stop_ids: Sequence[int]) -> list[str]:
    """Each row's new text, without the stop token that ended it."""
    stops = set(stop_ids)
    return [tokenizer.decode(ids[:-1] if ids and ids[-1] in stops else ids) for ids in generation.completions()]


def generate_all(generator: Generator, prompts: Sequence[Sequence[int]], seed: int | Sequence[int] = 0,
                 num_return_sequences: int = 1, progress: bool = False, first_row: int = 0) -> Generation:
    """Every prompt `num_return_sequences` times (prompt i's sequences are rows i*n .. i*n + n - 1), in calls of
    ``generator.batch_size`` rows; the call starting at row r draws its numbers from the seed
    (seed..., first_row + r)."""
    from tqdm import tqdm

    rows = [prompt for prompt in prompts for _ in range(num_return_sequences)]
    seeds = list(seed) if isinstance(seed, Sequence) else [seed]
    parts = []
    with tqdm(total=len(rows), desc="generate", unit=" rows", disable=not progress) as bar:
        for start in range(0, len(rows), generator.batch_size):
            parts.append(generator.generate(rows[start:start + generator.batch_size], seed=seeds + [first_row + start]))
            bar.update(len(parts[-1].lengths))
    return Generation.concatenate(parts)

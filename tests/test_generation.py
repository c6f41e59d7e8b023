"""KV-cache generation against transformers (the reference): greedy tokens, the sampling distribution, the
log-probabilities it reports, per-row stops, seeds; `msllm generate` on a batch of prompts.

Tolerances: greedy tokens equal exactly; a sampled token's log-probability within 1e-5 of a full forward pass of
the finished sequence (measured <= 4e-6 on Qwen2, Qwen3 and DeepSeek-V3); sampling frequencies from stratified
uniforms within 1/rows of transformers' warped distribution (the inverse CDF is exact; 1/rows is the quantisation
of the uniforms).
"""
import json

import mindspore as ms
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.cli import main
from mindspore_llm.common import ConfigError
from mindspore_llm.generation import GenerationConfig, Generator, TokenSampler, left_pad, position_ids
from tests import reference

PROMPTS = [[5, 17, 42, 9, 33, 2], [3, 4], [7, 8, 9, 10]]  # left-padded to 6: 0, 4 and 2 padding slots
NEW_TOKENS = 10

CASES = {
    "qwen2": lambda d: reference.qwen2(d),  # q/k/v bias, untied head
    "qwen3": lambda d: reference.qwen3(d),  # q/k RMSNorm, head_dim 24 != 64/4, tied head
    # MLA: the cache holds the latent (c_kv, k_rope); MoE layers route every token (dense, dropless)
    "deepseek_v3": lambda d: reference.deepseek_v3(d),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, module_dir):
    directory = module_dir / request.param
    return CASES[request.param](directory), AutoModelForCausalLM.from_pretrained(directory)


def hf_greedy(hf_model, prompts, new_tokens, eos=None, pad=0):
    """transformers' generate on the same left-padded batch; new tokens only."""
    ids, mask = left_pad(prompts, max(map(len, prompts)), pad)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_equals_transformers_and_rows_stop_at_their_own_eos(pair):
    """A left-padded batch of 3 in 4 compiled rows (one filler), greedy; the stop id is a token row 1 produces
    early, so row 1 stops there and the others run on (transformers pads a finished row with pad_token_id, as we
    do)."""
    hf_model, model = pair
    eos = int(hf_greedy(hf_model, PROMPTS, NEW_TOKENS)[1, 2])
    expected = hf_greedy(hf_model, PROMPTS, NEW_TOKENS, eos=eos)
    generation = Generator(model, GenerationConfig(NEW_TOKENS, eos_token_id=(eos,)), 4, 6).generate(PROMPTS)
    assert generation.lengths[1] <= 3
    for row in range(len(PROMPTS)):
        stop = generation.lengths[row]
        assert stop == (list(expected[row]).index(eos) + 1 if eos in expected[row] else NEW_TOKENS)
        np.testing.assert_array_equal(generation.tokens[row, :stop], expected[row, :stop])
        assert (generation.tokens[row, stop:] == 0).all() and (generation.log_probs[row, stop:] == 0).all()


def full_forward_log_probs(model, generation, temperature):
    mask = np.concatenate([generation.prompt_mask, generation.completion_mask], axis=1)
    ids = np.concatenate([generation.prompt_ids, generation.tokens], axis=1)
    logits = model(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(position_ids(mask))).asnumpy().astype(np.float64)
    logits = logits[:, generation.prompt_ids.shape[1] - 1:-1] / temperature
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs, generation.tokens[..., None].astype(np.int64), 2)[..., 0]
    return picked * generation.completion_mask


def test_sampled_log_probs_equal_a_full_forward_pass_and_seeds_repeat(pair):
    """temperature 0.7, top-k 20, top-p 0.9 (the unfiltered path is checked against the warpers below)."""
    _, model = pair
    config = GenerationConfig(NEW_TOKENS, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=(1, 2))
    generator = Generator(model, config, len(PROMPTS), 6)
    generation = generator.generate(PROMPTS, seed=3)
    error = np.abs(generation.log_probs - full_forward_log_probs(model, generation, config.temperature)).max()
    assert error <= 1e-5, error
    again, other = (generator.generate(PROMPTS, seed=s).tokens for s in (3, 4))
    np.testing.assert_array_equal(again, generation.tokens)
    assert (other != generation.tokens).any()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.5, 7, 1.0), (0.9, 12, 0.6)])
def test_sampling_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    """2048 rows of one logit vector with stratified uniforms (i + 0.5) / 2048: token j must be drawn by
    p_j x 2048 rows up to one, p from transformers' TemperatureLogitsWarper -> TopK -> TopP and softmax."""
    rows, vocab = 2048, 40
    logits = np.random.default_rng(0).normal(0, 2, vocab).astype(np.float32)
    warped = torch.tensor(logits)[None]
    for warper in [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
            ([TopPLogitsWarper(top_p)] if top_p < 1 else []):
        warped = warper(None, warped)
    expected = torch.softmax(warped, -1)[0].double().numpy()
    sampler = TokenSampler(GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p), vocab)
    uniform = ((np.arange(rows) + 0.5) / rows).astype(np.float32)
    tokens, log_probs = sampler(ms.Tensor(np.tile(logits, (rows, 1))), ms.Tensor(uniform))
    counts = np.bincount(tokens.asnumpy(), minlength=vocab)
    assert np.abs(counts / rows - expected).max() <= 1 / rows + 1e-6, (counts / rows, expected)
    assert (counts[expected == 0] == 0).all()  # nothing outside the filtered set
    scaled = logits.astype(np.float64) / temperature
    unfiltered = scaled - np.log(np.exp(scaled - scaled.max()).sum()) - scaled.max()
    np.testing.assert_allclose(log_probs.asnumpy(), unfiltered[tokens.asnumpy()], atol=1e-5)


def test_prompts_beyond_the_compiled_shapes_are_refused(pair):
    _, model = pair
    generator = Generator(model, GenerationConfig(4), 2, 4)
    with pytest.raises(ConfigError, match="prompt 0: 6 tokens; prompts must hold 1 to 4 tokens"):
        generator.generate([PROMPTS[0]])
    with pytest.raises(ConfigError, match="1 to 2 prompts per call, got 3"):
        generator.generate(PROMPTS)


def test_cli_generates_a_batch_from_a_prompts_file(module_dir):
    """`msllm generate --prompts-file` (.jsonl, chat-rendered) with sampled return sequences and --output."""
    from tests.test_from_pretrained import word_tokenizer

    directory = module_dir / "cli"
    hf_model = reference.qwen2(directory)
    word_tokenizer(hf_model.config.vocab_size).save(str(directory / "tokenizer.json"))
    prompts = directory / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "w1 w2 w3"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "w4"}]}) + "\n")
    output = directory / "samples.jsonl"
    result = CliRunner().invoke(main, ["generate", str(directory), "--prompts-file", str(prompts),
                                       "--num-return-sequences", "3", "--temperature", "1.0", "--max-new-tokens",
                                       "5", "--seed", "4", "--batch-size", "4", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert result.output.count("=== prompt ") == 6
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["sequence"] for r in records] == [0, 1, 2, 0, 1, 2]
    assert all(len(r["token_ids"]) == 5 for r in records)
    assert len({tuple(r["token_ids"]) for r in records[:3]}) > 1  # sampled, not three greedy copies
    again = CliRunner().invoke(main, ["generate", str(directory), "--prompts-file", str(prompts),
                                      "--num-return-sequences", "3", "--temperature", "0"])
    assert again.exit_code == 2 and "--temperature > 0" in again.output

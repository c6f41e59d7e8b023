"""SFT data: chat template rendering (reference: transformers' apply_chat_template on the shipped tokenizer),
loss only on assistant tokens, truncation and packing without attention across samples."""
import json

import mindspore as ms
import numpy as np
import pytest
from transformers import AutoTokenizer

from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.data import TINY_ASSETS, DataConfig, build_sequences, encode_conversation
from mindspore_llm.models.layers import AttentionMask, CausalLMLoss
from mindspore_llm.tokenizer import load_tokenizer

SFT = TINY_ASSETS / "sft.jsonl"
CONVERSATIONS = [json.loads(line)["messages"] for line in SFT.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_ASSETS)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(str(TINY_ASSETS))


def sft_config(**overrides):
    return DataConfig(**{"kind": "sft", "path": str(SFT), "tokenizer": str(TINY_ASSETS), "seq_length": 128,
                         "shuffle": False, **overrides})


def test_shipped_tokenizer_is_chatml_with_eos_and_pad(tokenizer):
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    assert 256 < tokenizer.vocab_size <= 1000


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_as_transformers(tokenizer, hf_tokenizer, add_generation_prompt):
    conversations = CONVERSATIONS[:40] + [[{"role": "user", "content": "Ünïcode & <tags>"}]]
    for messages in conversations:
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == \
            hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_custom_template_environment_as_transformers(tmp_path, hf_tokenizer):
    """Special-token variables, tojson, loop controls, {% generation %} and raise_exception behave as in
    transformers (same template, same tokenizer files)."""
    template = ("{{ bos_token or '' }}{% for m in messages %}{% if m.role == 'tool' %}{% continue %}{% endif %}"
                "{% if m.role not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role') }}{% endif %}"
                "[{{ m.role }}]{% if m.role == 'assistant' %}{% generation %}{{ m.content | tojson }}"
                "{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    (tmp_path / "tokenizer.json").write_bytes((TINY_ASSETS / "tokenizer.json").read_bytes())
    config = json.loads((TINY_ASSETS / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "Ünï"}, {"role": "tool", "content": "x"},
                {"role": "assistant", "content": 'say "hi" é'}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False)
    assert '"say \\"hi\\" é"<|im_end|>' in ours.apply_chat_template(messages)


def test_token_ids_equal_transformers_tokenization(tokenizer, hf_tokenizer):
    """ChatML renders history as trained: one sequence per conversation, the tokenization of the whole rendering."""
    for messages in CONVERSATIONS[:100]:
        [(ids, _)] = encode_conversation(tokenizer, messages, "test")
        assert ids == hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


def test_labels_cover_exactly_assistant_content_and_end_of_turn(tokenizer):
    for messages in CONVERSATIONS:
        [(ids, labels)] = encode_conversation(tokenizer, messages, "test")
        counted = [label for label in labels if label != IGNORE_INDEX]
        assistant = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        # independent count: each assistant turn tokenized on its own
        assert len(counted) == sum(len(tokenizer.encode(text)) for text in assistant)
        assert tokenizer.decode(counted) == "".join(assistant)
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))


# As Qwen3's: only assistant turns after the last user message carry a (here empty) think block, so an earlier
# turn renders differently once a later user message follows.
THINKING_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_turn_the_template_rewrites_later_is_trained_in_a_sequence_of_its_own(tmp_path):
    """Each turn is trained after its inference prompt: the first turn with the think block the template gives a
    final turn, the second after the history as the template renders it (without it)."""
    (tmp_path / "tokenizer.json").write_bytes((TINY_ASSETS / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": THINKING_TEMPLATE}))
    tokenizer, hf_tokenizer = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "Say Hello"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Say a"}, {"role": "assistant", "content": "a"}]
    samples = encode_conversation(tokenizer, messages, "test")
    assert len(samples) == 2
    for (ids, labels), turn in zip(samples, (1, 3)):
        prompt = hf_tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
        assert ids[:len(prompt)] == prompt and set(labels[:len(prompt)]) == {IGNORE_INDEX}
        counted = [label for label in labels if label != IGNORE_INDEX]
        assert tokenizer.decode(counted) == f"<think>\n\n</think>\n\n{messages[turn]['content']}<|im_end|>"
    [(ids, labels)] = encode_conversation(tokenizer, messages, "test", multi_turn="last")
    assert ids[:len(samples[1][0])] == samples[1][0] and labels[:len(samples[1][1])] == samples[1][1]


def test_model_loss_counts_exactly_the_assistant_tokens(tokenizer):
    """CausalLMLoss (the model's shift) counts as many targets per batch as there are assistant tokens."""
    arrays = build_sequences(sft_config(seq_length=128))
    expected = sum(len(tokenizer.encode(m["content"] + "<|im_end|>"))
                   for messages in CONVERSATIONS[:8] for m in messages if m["role"] == "assistant")
    logits = ms.Tensor(np.random.default_rng(0).normal(size=(8, 128, tokenizer.vocab_size)), ms.float32)
    _, count = CausalLMLoss()(logits, ms.Tensor(arrays["labels"][:8]))
    assert int(count.asnumpy()) == expected


def test_instruction_records_become_conversations(tmp_path, tokenizer):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Add.", "input": "2 + 3", "output": "5"}) + "\n"
                    + json.dumps({"system": "Be brief.", "instruction": "Hi", "output": "Hello"}) + "\n")
    arrays = build_sequences(sft_config(path=str(path), seq_length=64))
    expected = [[{"role": "user", "content": "Add.\n\n2 + 3"}, {"role": "assistant", "content": "5"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello"}]]
    for row, messages in enumerate(expected):
        [(ids, labels)] = encode_conversation(tokenizer, messages, "test")
        np.testing.assert_array_equal(arrays["input_ids"][row, :len(ids)], ids)
        np.testing.assert_array_equal(arrays["labels"][row, :len(ids)], labels)


def test_long_samples_truncated_and_short_ones_padded(tokenizer):
    arrays = build_sequences(sft_config(seq_length=40))
    [(ids, labels)] = encode_conversation(tokenizer, CONVERSATIONS[0], "test")
    assert len(ids) > 40
    np.testing.assert_array_equal(arrays["input_ids"][0], ids[:40])
    np.testing.assert_array_equal(arrays["labels"][0], labels[:40])
    padded = build_sequences(sft_config(seq_length=128))
    n = len(ids)
    assert (padded["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert (padded["labels"][0, n:] == IGNORE_INDEX).all() and (padded["attention_mask"][0, n:] == 0).all()
    np.testing.assert_array_equal(padded["attention_mask"][0, :n], 1)
    np.testing.assert_array_equal(padded["position_ids"][0, :n], np.arange(n))


def test_packing_keeps_every_sample_whole_with_its_own_document(tokenizer):
    arrays = build_sequences(sft_config(seq_length=256, packing=True))
    samples = [sample for m in CONVERSATIONS for sample in encode_conversation(tokenizer, m, "test")]
    unpacked = []
    for row in range(len(arrays["input_ids"])):
        mask = arrays["attention_mask"][row]
        documents = mask[mask > 0]
        assert documents[0] == 1 and (np.diff(documents) >= 0).all() and (np.diff(documents) <= 1).all()
        assert (mask[len(documents):] == 0).all(), "padding only at the end"
        for doc in range(1, documents.max() + 1):
            where = mask == doc
            np.testing.assert_array_equal(arrays["position_ids"][row, where], np.arange(where.sum()))
            unpacked.append((arrays["input_ids"][row, where].tolist(), arrays["labels"][row, where].tolist()))
    assert unpacked == samples
    assert len(arrays["input_ids"]) < len(samples) / 2


def test_packed_samples_do_not_attend_to_each_other():
    """The model's attention bias (AttentionMask, graph mode) on a packed batch: query i sees key j exactly when
    j <= i and both are tokens of the same sample."""
    mask = build_sequences(sft_config(seq_length=256, packing=True))["attention_mask"][:4]
    bias = AttentionMask()(ms.Tensor(mask), 256).asnumpy()[:, 0]
    causal = np.tril(np.ones((256, 256), bool))
    same_doc = (mask[:, :, None] == mask[:, None, :]) & (mask[:, None, :] > 0)
    np.testing.assert_array_equal(bias == 0, causal & same_doc)
    assert (mask.max(axis=1) >= 3).all(), "several samples per row"

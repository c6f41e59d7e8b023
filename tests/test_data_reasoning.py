"""SFT on reasoning traces with the chat templates the models publish (DeepSeek-R1-Distill-Qwen-32B, Qwen3) and
ChatML. Reference for every prompt: transformers' ``apply_chat_template(history, add_generation_prompt=True,
tokenize=True)`` with the same tokenizer files; every trained span is written out below as the model would write it."""
import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from mindspore_llm.cli import main
from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.data import TINY_ASSETS, DataConfig, build_sequences, encode_conversation
from mindspore_llm.data.chat import ThinkingFormat, render_generation_prompt, split_reasoning
from mindspore_llm.tokenizer import load_tokenizer
from tests.reasoning_fixtures import R1_EOS, make_tokenizer_dir

QUESTION = {"role": "user", "content": "What is 2 + 3?"}
INLINE = [QUESTION, {"role": "assistant", "content": "<think>\nAdd 2 and 3.\n</think>\n\nThe answer is 5."}]
REASONING_CONTENT = [QUESTION,
                     {"role": "assistant", "content": "The answer is 5.", "reasoning_content": "Add 2 and 3."}]
TWO_TURNS = INLINE + [{"role": "user", "content": "And 4 + 4?"},
                      {"role": "assistant", "content": "<think>\nAdd 4 and 4.\n</think>\n\nThe answer is 8."}]
NO_REASONING = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]
RECORDS = {"inline": INLINE, "reasoning_content": REASONING_CONTENT, "two_turns": TWO_TURNS,
           "no_reasoning": NO_REASONING}

# (record, family) -> the trained text of each assistant turn (its index in the record), one sequence per turn
R1_FIVE = f"Add 2 and 3.\n</think>\n\nThe answer is 5.{R1_EOS}"  # after the prompt's <｜Assistant｜><think>\n
QWEN3_FIVE = "<think>\nAdd 2 and 3.\n</think>\n\nThe answer is 5.<|im_end|>"  # after <|im_start|>assistant\n
EXPECTED = {
    ("inline", "r1"): {1: R1_FIVE},
    ("reasoning_content", "r1"): {1: R1_FIVE},
    ("two_turns", "r1"): {1: R1_FIVE, 3: f"Add 4 and 4.\n</think>\n\nThe answer is 8.{R1_EOS}"},
    ("no_reasoning", "r1"): {1: f"\n</think>\n\nHello!{R1_EOS}"},
    ("inline", "qwen3"): {1: QWEN3_FIVE},
    ("reasoning_content", "qwen3"): {1: QWEN3_FIVE},
    ("two_turns", "qwen3"): {1: QWEN3_FIVE, 3: "<think>\nAdd 4 and 4.\n</think>\n\nThe answer is 8.<|im_end|>"},
    ("no_reasoning", "qwen3"): {1: "<think>\n\n</think>\n\nHello!<|im_end|>"},
}


@pytest.fixture(scope="module")
def tokenizers(module_dir):
    """family -> (our tokenizer, transformers' AutoTokenizer) of one directory; "chatml" is the shipped one."""
    directories = {family: make_tokenizer_dir(module_dir / family, family) for family in ("r1", "qwen3")}
    directories["chatml"] = TINY_ASSETS
    return {family: (load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))) for family, d in directories.items()}


def hf_prompt(hf_tokenizer, history, **kwargs) -> list[int]:
    return hf_tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False,
                                            **kwargs)


def check_turn(tokenizer, sample, prompt, expected):
    """`sample` is `prompt` (not counted) followed by exactly the tokens of `expected` (counted)."""
    ids, labels = sample
    assert ids[:len(prompt)] == prompt, tokenizer.decode(ids[:len(prompt)])
    assert set(labels[:len(prompt)]) == {IGNORE_INDEX}
    counted = [label for label in labels if label != IGNORE_INDEX]
    assert labels[len(prompt):len(prompt) + len(counted)] == counted, "the trained tokens follow the prompt"
    assert tokenizer.decode(counted) == expected
    assert ids[len(prompt):len(prompt) + len(counted)] == tokenizer.encode(expected)


@pytest.mark.parametrize("record, family", sorted(EXPECTED))
def test_each_turn_trains_what_the_model_writes_after_its_inference_prompt(tokenizers, record, family):
    tokenizer, hf_tokenizer = tokenizers[family]
    messages = RECORDS[record]
    samples = encode_conversation(tokenizer, messages, "test")
    expected = EXPECTED[(record, family)]
    assert len(samples) == len(expected), "a template that drops earlier reasoning: one sequence per turn"
    for sample, (turn, text) in zip(samples, expected.items()):
        prompt = hf_prompt(hf_tokenizer, messages[:turn])
        assert render_generation_prompt(tokenizer, messages[:turn]) == prompt
        check_turn(tokenizer, sample, prompt, text)


def test_the_r1_template_history_is_the_templates_own(tokenizers):
    """The second turn's prompt holds the first turn as R1 renders history: its answer only."""
    tokenizer, _ = tokenizers["r1"]
    _, (ids, labels) = encode_conversation(tokenizer, TWO_TURNS, "test")
    context = tokenizer.decode([token for token, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert context == ("<｜begin▁of▁sentence｜><｜User｜>What is 2 + 3?<｜Assistant｜>\n\nThe answer is 5."
                       f"{R1_EOS}<｜User｜>And 4 + 4?<｜Assistant｜><think>\n")


@pytest.mark.parametrize("family, kwargs, expected", [
    ("r1", {}, f"\n</think>\n\nThe answer is 5.{R1_EOS}"),  # no no-thinking prompt: close the opened block at once
    ("qwen3", {"enable_thinking": False}, "The answer is 5.<|im_end|>"),  # after its empty think block
    ("chatml", {}, "The answer is 5.<|im_end|>"),
])
def test_reasoning_drop_trains_answers_after_the_no_thinking_prompt(tokenizers, family, kwargs, expected):
    tokenizer, hf_tokenizer = tokenizers[family]
    for messages in (INLINE, REASONING_CONTENT):
        [sample] = encode_conversation(tokenizer, messages, "test", reasoning="drop")
        check_turn(tokenizer, sample, hf_prompt(hf_tokenizer, messages[:1], **kwargs), expected)


def test_a_template_without_thinking_format_keeps_todays_rendering(tokenizers):
    """ChatML (Qwen2.5): the content as written; reasoning_content goes inline in the R1 form; all turns of a
    conversation in one sequence, since the history is rendered as trained."""
    tokenizer, hf_tokenizer = tokenizers["chatml"]
    assert ThinkingFormat.of(tokenizer) == ThinkingFormat(False, False, {})
    for messages in (INLINE, REASONING_CONTENT):
        [sample] = encode_conversation(tokenizer, messages, "test")
        check_turn(tokenizer, sample, hf_prompt(hf_tokenizer, messages[:1]), QWEN3_FIVE)
    [(ids, labels)] = encode_conversation(tokenizer, TWO_TURNS, "test")
    assert ids == hf_tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=False)
    assert tokenizer.decode([label for label in labels if label != IGNORE_INDEX]) == \
        QWEN3_FIVE + "<think>\nAdd 4 and 4.\n</think>\n\nThe answer is 8.<|im_end|>"


def test_thinking_formats_are_read_off_the_renderings(tokenizers):
    assert ThinkingFormat.of(tokenizers["r1"][0]) == ThinkingFormat(True, False, {})
    assert ThinkingFormat.of(tokenizers["qwen3"][0]) == ThinkingFormat(False, True, {"enable_thinking": False})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def test_expanded_turns_are_packed_and_counted(tokenizers, module_dir, tmp_path, caplog):
    """A two-turn R1 conversation is two documents (multi_turn: expand) or one (last); the MindRecord's
    counted_tokens is the sum over them; the run log names the template, thinking format and multi-turn rule."""
    tokenizer, _ = tokenizers["r1"]
    path = write_jsonl(tmp_path / "r1.jsonl", [{"messages": TWO_TURNS}, {"messages": NO_REASONING}])
    samples = [s for m in (TWO_TURNS, NO_REASONING) for s in encode_conversation(tokenizer, m, "test")]
    config = dict(kind="sft", path=str(path), tokenizer=str(module_dir / "r1"), seq_length=256, packing=True,
                  shuffle=False)
    with caplog.at_level(logging.INFO, logger="mindspore_llm"):
        arrays = build_sequences(DataConfig(**config))
    [line] = [r.getMessage() for r in caplog.records if "thinking format" in r.getMessage()]
    assert str(module_dir / "r1" / "chat_template.jinja") in line and "R1 style" in line and "expand" in line
    assert arrays["attention_mask"].max() == 3 and len(arrays["input_ids"]) == 1
    counted = int((arrays["labels"] != IGNORE_INDEX).sum())
    assert counted == sum(label != IGNORE_INDEX for _, labels in samples for label in labels)
    last = build_sequences(DataConfig(**config, multi_turn="last"))
    assert last["attention_mask"].max() == 2
    yaml = tmp_path / "data.yaml"
    yaml.write_text("\n".join(f"{key}: {value}" for key, value in config.items()) + "\n")
    result = CliRunner().invoke(main, ["preprocess", "--data-config", str(yaml), "--output", str(tmp_path / "mr")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "mr" / "meta.json").read_text())
    assert (meta["counted_tokens"], meta["num_sequences"], meta["multi_turn"]) == (counted, 1, "expand")


def test_instruction_records_carry_reasoning_inline_in_output(tokenizers, module_dir, tmp_path):
    tokenizer, _ = tokenizers["r1"]
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": QUESTION["content"],
                                                    "output": INLINE[1]["content"]}])
    arrays = build_sequences(DataConfig(kind="sft", path=str(path), tokenizer=str(module_dir / "r1"), seq_length=64,
                                        reset_attention=False))
    [(ids, labels)] = encode_conversation(tokenizer, INLINE, "test")
    np.testing.assert_array_equal(arrays["input_ids"][0, :len(ids)], ids)
    np.testing.assert_array_equal(arrays["labels"][0, :len(ids)], labels)


@pytest.mark.parametrize("text, expected", [
    ("<think>\nAdd.\n</think>\n\nThe answer is 5.", ("Add.", "The answer is 5.")),
    ("Add.\n</think>\n\n5", ("Add.", "5")),  # generated after a prompt that opened the block
    ("<think>\n\n</think>\n\n5", ("", "5")),
    ("a</think>b</think>\n\nc", ("a</think>b", "c")),  # the answer follows the last </think>
    ("The answer is 5.", (None, "The answer is 5.")),
    ("<think>\nstill thinking", ("still thinking", "")),  # never closed: no answer
])
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected

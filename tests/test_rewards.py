"""Reward functions (math-verify's grading behind math_accuracy, the R1 format, exact match, user functions), the
prompt records GRPO and `msllm eval` read, and pass@k against brute-force enumeration. No model: fast."""
import itertools
import json

import numpy as np
import pytest

from mindspore_llm.common import ConfigError
from mindspore_llm.data.config import TINY_ASSETS, DataError
from mindspore_llm.rl.evaluate import pass_at_k
from mindspore_llm.rl.prompts import PromptDataset, load_prompts
from mindspore_llm.rl.rewards import (
    RewardConfig,
    Rewards,
    exact_match,
    final_answer,
    format_reward,
    load_reward,
    math_accuracy,
)
from mindspore_llm.tokenizer import load_tokenizer

MATH_CASES = [
    # (completion, reference answer, reward)
    ("<think>half of one</think> The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("so \\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("first \\boxed{3}, no wait: \\boxed{4}", "4", 1.0),  # the last box counts
    ("first \\boxed{3}, no wait: \\boxed{4}", "3", 0.0),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", 1.0),
    ("#### 1,000", "1000", 1.0),  # thousands separator
    ("\\boxed{72\\%}", "72%", 1.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt 2", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("7 + 5 = 12.", "12", 1.0),  # no box, no ####: the final expression
    ("7 + 5 = 13.", "12", 0.0),
    ("<think>it is \\boxed{12}</think> I do not know.", "12", 0.0),  # only the answer after </think> counts
    ("the box \\boxed{12 is never closed", "12", 0.0),
    ("", "12", 0.0),
]


@pytest.mark.parametrize("completion,answer,expected", MATH_CASES)
def test_math_accuracy(completion, answer, expected):
    assert math_accuracy("", completion, answer) == expected


def test_final_answer_reads_balanced_braces():
    assert final_answer("x \\boxed{\\frac{a}{b}} y") == "\\boxed{\\frac{a}{b}}"
    assert final_answer("<think>\\boxed{1}</think>#### 7 apples") == "7 apples"


@pytest.mark.parametrize("prompt,completion,expected", [
    ("Q", "<think>add them</think> 12", 1.0),
    ("Q<think>\n", "add them</think> 12", 1.0),  # an R1 template opens the block in the prompt
    ("Q", "add them</think> 12", 0.0),  # never opened
    ("Q", "<think>add them</think>   ", 0.0),  # no answer
    ("Q", "<think> </think> 12", 0.0),  # no reasoning
    ("Q", "<think>a</think> b <think>c</think> d", 0.0),  # two blocks
    ("Q", "12", 0.0),
])
def test_format_reward(prompt, completion, expected):
    assert format_reward(prompt, completion, "") == expected


def test_exact_match_compares_the_answer_after_the_reasoning():
    assert exact_match("", "<think>hm</think> The word plant reversed is tnalp. ",
                       "The word plant reversed is tnalp.") == 1.0
    assert exact_match("", "The word plant reversed is tnalp", "The word plant reversed is tnalp.") == 0.0


def half_credit(prompt, completion, answer):
    """A user reward for the test below."""
    return 0.5 if answer in completion else 0.0


def test_user_functions_and_weights():
    rewards = Rewards([RewardConfig(name="exact_match", weight=2.0),
                       RewardConfig(name="tests.test_rewards:half_credit", weight=1.0)])
    scores = rewards.score(["p", "p"], ["12", "it is 12!"], ["12", "12"])
    np.testing.assert_array_equal(scores["exact_match"], [1.0, 0.0])
    np.testing.assert_array_equal(scores["tests.test_rewards:half_credit"], [0.5, 0.5])
    np.testing.assert_array_equal(rewards.total(scores), [2.5, 0.5])


def test_bad_reward_names_are_config_errors():
    with pytest.raises(ConfigError, match="neither a built-in reward"):
        RewardConfig(name="accuracy").validate()
    with pytest.raises(ConfigError, match="tests.test_rewards:missing.*cannot be imported"):
        load_reward("tests.test_rewards:missing")


def test_pass_at_k_equals_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (8, 3, 8), (7, 1, 5)]:
        subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(np.mean([any(s) for s in subsets]), abs=1e-12)


def test_prompt_records_render_with_the_chat_template(tmp_path):
    tokenizer = load_tokenizer(TINY_ASSETS)
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Reverse the word plant.", "answer": 7}) + "\n\n" +
                    json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}], "answer": "Hello"}) + "\n")
    first, second = load_prompts(path, tokenizer)
    assert first.answer == "7" and first.where == f"{path}:1"
    assert first.text == tokenizer.apply_chat_template([{"role": "user", "content": "Reverse the word plant."}],
                                                       add_generation_prompt=True)
    assert list(first.ids) == tokenizer.encode(first.text)
    assert second.text.startswith("<|im_start|>system\nBe brief.") and second.where == f"{path}:3"


@pytest.mark.parametrize("record,message", [
    ({"prompt": "Hi"}, r'prompts.jsonl:1: expected an "answer"'),
    ({"question": "Hi", "answer": "1"}, r'prompts.jsonl:1: expected a string "prompt" or a "messages" list'),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "1"}], "answer": "1"},
     "the last message is the assistant's"),
    ({"messages": [{"role": "robot", "content": "Hi"}], "answer": "1"}, "unknown role 'robot'"),
])
def test_bad_prompt_records_name_the_line(tmp_path, record, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        load_prompts(path, load_tokenizer(TINY_ASSETS))


def test_prompt_stream_holds_whole_groups_and_resumes_anywhere(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(5)))
    dataset = PromptDataset(load_prompts(path, load_tokenizer(TINY_ASSETS)), group_size=3, seed=1)
    assert len(dataset) == 15
    stream = dataset.batches(6)
    batches = [next(stream) for _ in range(4)]  # 8 prompts: the first epoch and 3 of the second
    answers = [[p.answer for p in batch] for batch in batches]
    for batch in answers:
        assert batch[0] == batch[1] == batch[2] and batch[3] == batch[4] == batch[5]
    first_epoch = [batch[i] for batch in answers[:3] for i in (0, 3)][:5]
    assert sorted(first_epoch) == ["0", "1", "2", "3", "4"]  # every prompt once per epoch
    resumed = next(dataset.batches(6, start=12))
    assert [p.answer for p in resumed] == answers[2]
    with pytest.raises(ValueError, match="whole groups"):
        next(dataset.batches(4))

"""A tiny SFT run on R1-style reasoning traces with the chat template DeepSeek-R1-Distill-Qwen-32B publishes: the
loss falls, and greedy decoding from the trained model's final/ directory (its tokenizer and template copied there)
after the template's generation prompt writes a training trace's reasoning, ``</think>``, answer and end of
sentence, token for token."""
import json

import pytest

from mindspore_llm.data.chat import render_generation_prompt, split_reasoning
from mindspore_llm.generation import GenerationConfig, Generator
from mindspore_llm.models.auto import AutoModelForCausalLM
from mindspore_llm.tokenizer import load_tokenizer
from mindspore_llm.train.config import train_config_from_dict
from mindspore_llm.train.trainer import Trainer
from tests.reasoning_fixtures import R1_EOS, make_tokenizer_dir
from tests.test_trainer import tiny_raw_config

TRACES = [("What is 2 + 3?", "Add 2 and 3.", "The answer is 5."),
          ("What is 6 + 3?", "Add 6 and 3.", "The answer is 9."),
          ("What is 4 + 4?", "Add 4 and 4.", "The answer is 8."),
          ("Reverse the word cat.", "Read it backwards.", "tac")]  # prompts of one length: decoding compiles once


@pytest.fixture(scope="module")
def trained(module_dir):
    tokenizer_dir = make_tokenizer_dir(module_dir / "r1_tokenizer", "r1")
    data = module_dir / "traces.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}]}) + "\n"
        for question, reasoning, answer in TRACES))
    tokenizer = load_tokenizer(tokenizer_dir)
    raw = tiny_raw_config(
        module_dir / "run", model={"vocab_size": tokenizer.vocab_size, "max_position_embeddings": 64},
        data={"path": str(data), "tokenizer": str(tokenizer_dir), "seq_length": 64, "packing": False},
        schedule={"lr": 3e-3, "min_lr": 1e-3, "warmup_steps": 5},
        train={"micro_batch_size": 4, "gradient_accumulation_steps": 1, "steps": 100},
        checkpoint={"every_n_steps": 100}, logging={"tensorboard": False, "plot": False})
    return Trainer(train_config_from_dict(raw, "r1_sft")).run()


def test_loss_falls(trained):
    losses = [loss for _, loss in trained.losses]
    print("loss at steps 1, 25, 50, 100:", [round(losses[i], 3) for i in (0, 24, 49, 99)])
    # ln 518 = 6.25 at the start; memorised by step 100 (measured: 6.22 -> 0.023)
    assert losses[0] > 5.0 and max(losses[-5:]) < 0.1, losses


def test_greedy_generation_after_the_template_prompt_writes_a_training_trace(trained):
    directory = trained.final_model_dir
    tokenizer = load_tokenizer(directory)
    assert tokenizer.chat_template_source == directory / "chat_template.jinja"
    model = AutoModelForCausalLM.from_pretrained(directory)
    for question, reasoning, answer in TRACES:
        prompt = render_generation_prompt(tokenizer, [{"role": "user", "content": question}])
        assert tokenizer.decode(prompt).endswith(f"{question}<｜Assistant｜><think>\n")
        generator = Generator(model, GenerationConfig(40, eos_token_id=(tokenizer.eos_token_id,)), 1, len(prompt))
        generated = tokenizer.decode(generator.generate([prompt]).completions()[0])
        assert generated == f"{reasoning}\n</think>\n\n{answer}{R1_EOS}"
        assert split_reasoning(generated.removesuffix(R1_EOS)) == (reasoning, answer)

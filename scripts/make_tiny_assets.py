"""Write the tiny assets shipped in ``mindspore_llm/assets/tiny``: a synthetic SFT set, a pretraining text, a
byte-level BPE tokenizer trained on them with ChatML special tokens (as Qwen's), and a verifiable task for GRPO and
``msllm eval`` (word reversal prompts with their answers).

Deterministic: the same files on every run (fixed seed, single-threaded BPE training). Usage:
    python scripts/make_tiny_assets.py [--output mindspore_llm/assets/tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

# Before `tokenizers` starts its thread pool: one thread keeps the merge order reproducible.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from mindspore_llm.tokenizer import CHATML_TEMPLATE  # noqa: E402

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SEED = 20240501

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Russia": "Moscow", "Australia": "Canberra", "Ireland": "Dublin", "Austria": "Vienna",
}
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "paper", "light", "music", "ocean",
         "bread", "house", "smile", "train", "water", "night", "plant", "chair", "dream", "storm"]
GREETINGS = [("Hello!", "Hello! How can I help you today?"),
             ("Hi there.", "Hi! How can I help you today?"),
             ("Good morning!", "Good morning! How can I help you today?"),
             ("Who are you?", "I am Tiny Qwen, a small model trained with mindspore_llm."),
             ("What is your name?", "My name is Tiny Qwen."),
             ("Thank you!", "You are welcome!"),
             ("Goodbye.", "Goodbye! Have a nice day.")]


def capital_turn(rng):
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice(["What is the capital of {}?", "Name the capital of {}.", "Capital of {}?"])
    return question.format(country), f"The capital of {country} is {CAPITALS[country]}."


def arithmetic_turn(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."


def reverse_turn(rng):
    word = rng.choice(WORDS)
    return f"Reverse the word {word}.", f"The word {word} reversed is {word[::-1]}."


def greeting_turn(rng):
    return rng.choice(GREETINGS)


def conversations(rng, count):
    kinds = [capital_turn, arithmetic_turn, reverse_turn, greeting_turn]
    for index in range(count):
        messages = []
        if index % 5 == 0:
            messages.append({"role": "system", "content": "You are Tiny Qwen. Answer in one short sentence."})
        for _ in range(1 if rng.random() < 0.8 else 2):
            user, assistant = rng.choice(kinds)(rng)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        yield {"messages": messages}


def reversal_task():
    """The verifiable task of configs/tiny_qwen_grpo.yaml: every "Reverse the word w." of the SFT set's words, with
    the answer the SFT conversations give (checked by the exact_match reward)."""
    return [{"prompt": f"Reverse the word {word}.", "answer": f"The word {word} reversed is {word[::-1]}."}
            for word in WORDS]


def pretraining_documents(rng, count):
    for _ in range(count):
        countries = rng.sample(sorted(CAPITALS), 3)
        facts = " ".join(f"The capital of {c} is {CAPITALS[c]}." for c in countries)
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        word = rng.choice(WORDS)
        yield f"{facts}\n{a} plus {b} is {a + b}. The word {word} backwards is {word[::-1]}."


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=Path(__file__).resolve().parents[1] / "mindspore_llm/assets/tiny",
                        type=Path)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    sft = list(conversations(rng, 400))
    documents = list(pretraining_documents(rng, 300))
    (args.output / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (args.output / "pretrain.txt").write_text("\n\n".join(documents) + "\n")
    (args.output / "reverse_words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversal_task()))

    texts = [m["content"] for record in sft for m in record["messages"]] + documents
    texts += ["system", "user", "assistant", "You are a helpful assistant."]  # the ChatML role headers
    train_tokenizer(texts).save(str(args.output / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "bos_token": None,
        # As Qwen2.5-Instruct: a turn ends generation; <|endoftext|> pads (and separates pretraining documents).
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHATML_TEMPLATE,
    }
    (args.output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    total = sum(f.stat().st_size for f in args.output.iterdir())
    print(f"wrote {args.output}: {len(sft)} conversations, {len(documents)} documents, "
          f"vocab {VOCAB_SIZE}, {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

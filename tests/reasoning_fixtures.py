"""Tokenizer directories with the chat templates DeepSeek-R1-Distill-Qwen-32B and Qwen3 publish
(tests/fixtures/chat_templates/, origin in its README.md): the shipped byte-level BPE plus the models' turn markers
and end of sentence as special tokens and ``<think>``/``</think>`` as added tokens, as in the published tokenizers."""
import json
import shutil
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from mindspore_llm.data import TINY_ASSETS

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
FAMILIES = {
    "r1": {"template": "DeepSeek-R1-Distill-Qwen-32B.jinja",
           "special": [R1_BOS, R1_EOS, "<｜User｜>", "<｜Assistant｜>"],
           "config": {"bos_token": R1_BOS, "eos_token": R1_EOS, "pad_token": R1_EOS}},
    "qwen3": {"template": "Qwen3.jinja", "special": [],  # ChatML's markers are already special in the shipped one
              "config": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}},
}


def make_tokenizer_dir(directory: Path, family: str) -> Path:
    """`directory` with tokenizer.json, tokenizer_config.json and the family's chat_template.jinja."""
    spec = FAMILIES[family]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = HFTokenizer.from_file(str(TINY_ASSETS / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in spec["special"]])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in ("<think>", "</think>")])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **spec["config"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    shutil.copyfile(TEMPLATES / spec["template"], directory / "chat_template.jinja")
    return directory

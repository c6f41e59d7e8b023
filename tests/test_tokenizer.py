"""Tokenizer directories as transformers reads them: where the chat template comes from (reference:
AutoTokenizer.from_pretrained on the same files), the ChatML fallback said out loud, special tokens missing from the
vocabulary named, sentencepiece labels from one encoding of the whole text, and the tokenizer (with its template)
copied into the model directories msllm-ckpt writes."""
import io
import json
import logging
import shutil

import pytest
from transformers import AutoTokenizer

from ckpt_tools.convert import write_side_files
from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.data import TINY_ASSETS, DataConfig, DataError, build_sequences, encode_conversation
from mindspore_llm.tokenizer import load_tokenizer, tokenizer_files

CONVERSATIONS = [json.loads(line)["messages"] for line in (TINY_ASSETS / "sft.jsonl").read_text().splitlines()]
MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
JINJA = "{% for m in messages %}[jinja {{ m.role }}] {{ m.content }}\n{% endfor %}"
CONFIG = "{% for m in messages %}[config {{ m.role }}] {{ m.content }}\n{% endfor %}"
JSON = "{% for m in messages %}[json {{ m.role }}] {{ m.content }}\n{% endfor %}"


def tokenizer_dir(path, config_template=None, jinja=None, json_template=None):
    path.mkdir()
    shutil.copyfile(TINY_ASSETS / "tokenizer.json", path / "tokenizer.json")
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps({**config, **({"chat_template": config_template}
                                                                        if config_template else {})}))
    if jinja:
        (path / "chat_template.jinja").write_text(jinja)
    if json_template:
        (path / "chat_template.json").write_text(json.dumps({"chat_template": json_template}))
    return path


@pytest.mark.parametrize("files, used", [
    ({"config_template": CONFIG, "jinja": JINJA, "json_template": JSON}, "chat_template.jinja"),
    ({"config_template": CONFIG, "json_template": JSON}, "tokenizer_config.json"),
    ({"config_template": CONFIG}, "tokenizer_config.json"),
    ({"jinja": JINJA}, "chat_template.jinja"),
])
def test_chat_template_is_the_one_transformers_reads(tmp_path, files, used):
    path = tokenizer_dir(tmp_path / "tok", **files)
    ours = load_tokenizer(path)
    assert ours.chat_template_source == path / used
    assert ours.apply_chat_template(MESSAGES) == \
        AutoTokenizer.from_pretrained(str(path)).apply_chat_template(MESSAGES, tokenize=False)


def test_a_processors_chat_template_json_is_read_when_nothing_else_has_one(tmp_path):
    """AutoTokenizer ignores chat_template.json (AutoProcessor reads it); rather it than ChatML."""
    path = tokenizer_dir(tmp_path / "tok", json_template=JSON)
    ours = load_tokenizer(path)
    assert ours.chat_template_source == path / "chat_template.json"
    assert ours.apply_chat_template(MESSAGES) == "[json user] Hi\n[json assistant] Hello\n"


def test_chatml_fallback_is_said_loudly_and_logged(tmp_path, caplog):
    path = tokenizer_dir(tmp_path / "tok")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    with caplog.at_level(logging.INFO, logger="mindspore_llm"):
        build_sequences(DataConfig(kind="sft", path=str(jsonl), tokenizer=str(path), seq_length=32))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NO CHAT TEMPLATE" in warnings[0] and str(path) in warnings[0]
    assert any("ChatML chat template (fallback" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_special_token_missing_from_the_vocabulary_is_named(tmp_path):
    path = tokenizer_dir(tmp_path / "tok")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    with pytest.raises(DataError, match=r"eos_token '<\|eot\|>' named in .*tokenizer_config.json is not a token of "
                                        r".*tokenizer.json"):
        build_sequences(DataConfig(kind="sft", path=str(jsonl), tokenizer=str(path), seq_length=32))


@pytest.fixture(scope="module")
def sentencepiece_dir(module_dir):
    """A sentencepiece unigram model of the shipped conversations, ChatML markers as user-defined symbols, identity
    normalization (whitespace kept as written, as in Llama-style models)."""
    import sentencepiece as spm

    texts = [m["content"] for messages in CONVERSATIONS for m in messages] + ["system", "user", "assistant"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=400,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   character_coverage=1.0, byte_fallback=True, minloglevel=2)
    directory = module_dir / "sentencepiece"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    shutil.copyfile(TINY_ASSETS / "tokenizer_config.json", directory / "tokenizer_config.json")  # ChatML
    return directory


def test_sentencepiece_labels_come_from_one_encoding_of_the_whole_text(sentencepiece_dir):
    """Encoded piece by piece, every piece would get sentencepiece's "▁" prefix; the ids must be the tokenizer's
    encoding of the full rendering and the labels exactly its assistant turns."""
    tokenizer = load_tokenizer(sentencepiece_dir)
    assert tokenizer.source.suffix == ".model"
    for messages in CONVERSATIONS[:60]:
        [(ids, labels)] = encode_conversation(tokenizer, messages, "test")
        assert ids == tokenizer.encode(tokenizer.apply_chat_template(messages))
        counted = [label for label in labels if label != IGNORE_INDEX]
        assert tokenizer.decode(counted) == "".join(m["content"] + "<|im_end|>" for m in messages
                                                    if m["role"] == "assistant")


def test_sentencepiece_offsets_are_characters_not_bytes(sentencepiece_dir):
    tokenizer = load_tokenizer(sentencepiece_dir)
    text = "Ünïcode <|im_end|> é"
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert [text[a:b] for a, b in offsets if b > a and text[a:b] == "<|im_end|>"] == ["<|im_end|>"]
    assert offsets[-1][1] == len(text) and ids == tokenizer.encode(text)


def test_exported_model_directories_carry_the_tokenizer_and_its_template(tmp_path):
    """What msllm-ckpt hf2ms / ms2hf / merge-lora write beside the weights (write_side_files), and the training's
    final/ directory (tokenizer_files): the vocabulary, tokenizer_config.json and chat_template.jinja together."""
    source = tokenizer_dir(tmp_path / "tok", config_template=CONFIG, jinja=JINJA)
    (tmp_path / "other").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    write_side_files({"architectures": ["Qwen2ForCausalLM"]}, [tmp_path / "other", source], out, dequantized=False)
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert load_tokenizer(out).apply_chat_template(MESSAGES) == load_tokenizer(source).apply_chat_template(MESSAGES)
    assert {p.name for p in tokenizer_files(source / "tokenizer.json")} == \
        {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}

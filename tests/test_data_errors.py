"""Bad data input: errors name the file and line (or the config field) and the problem."""
import json

import pytest
from click.testing import CliRunner

from mindspore_llm.cli import main
from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict
from mindspore_llm.data import TINY_ASSETS, DataConfig, DataError, build_dataset

GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})


def sft(tmp_path, lines, **overrides):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return DataConfig(**{"kind": "sft", "path": str(path), "tokenizer": str(TINY_ASSETS), "seq_length": 64,
                         **overrides}), path


@pytest.mark.parametrize("bad_line, problem", [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), 'string "content"'),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant message"),
    (json.dumps({"prompt": "x", "completion": "y"}), 'expected "messages" or "instruction" and "output"'),
])
def test_bad_line_names_file_and_line(tmp_path, bad_line, problem):
    config, path = sft(tmp_path, [GOOD, "", GOOD, bad_line, GOOD])
    with pytest.raises(DataError, match=f"{path}:4: .*{problem}"):
        build_dataset(config)


def test_template_exception_names_the_line(tmp_path):
    template = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}" \
               "{% endif %}{{ m.content }}{% endfor %}"
    (tmp_path / "tokenizer.json").write_bytes((TINY_ASSETS / "tokenizer.json").read_bytes())
    config = {"chat_template": template, "pad_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    system = json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]})
    config, path = sft(tmp_path, [GOOD, system], tokenizer=str(tmp_path))
    with pytest.raises(DataError, match=f"{path}:2: .*no system"):
        build_dataset(config)


def test_empty_dataset(tmp_path):
    config, path = sft(tmp_path, ["", "  "])
    with pytest.raises(DataError, match=f"{path}: no samples"):
        build_dataset(config)


def test_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n\nna\xefve\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{path}: not UTF-8 text"):
        build_dataset(DataConfig(kind="pretrain", path=str(path), tokenizer=str(TINY_ASSETS), seq_length=8))


def test_missing_tokenizer_and_data(tmp_path):
    config, _ = sft(tmp_path, [GOOD], tokenizer=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="data.tokenizer: .*nowhere does not exist"):
        build_dataset(config)
    (tmp_path / "empty").mkdir()
    config, _ = sft(tmp_path, [GOOD], tokenizer=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="data.tokenizer: .*no tokenizer.json"):
        build_dataset(config)
    with pytest.raises(DataError, match="data.path: .*missing.jsonl does not exist"):
        build_dataset(DataConfig(kind="sft", path=str(tmp_path / "missing.jsonl"), tokenizer=str(TINY_ASSETS),
                                 seq_length=64))


@pytest.mark.parametrize("overrides, message", [
    ({"seq_length": 1}, "train.yaml: data: seq_length: must be at least 2"),
    ({"kind": "chat"}, "train.yaml: data.kind: 'chat' is not one of"),
    ({"packing": True, "kind": "pretrain"}, "packing: applies to kind sft"),
    ({"packing": True, "reset_attention": False}, "reset_attention: must be true with packing"),
    ({"seqlen": 4}, "unknown key.* seqlen"),
])
def test_config_errors_name_the_field(overrides, message):
    section = {"kind": "sft", "path": "a.jsonl", "tokenizer": "tok", "seq_length": 64, **overrides}
    with pytest.raises(ConfigError, match=message):
        from_dict(DataConfig, section, "train.yaml: data")


def test_preprocess_reports_bad_input_and_writes_nothing(tmp_path):
    config, path = sft(tmp_path, [GOOD, "{oops"])
    yaml = tmp_path / "data.yaml"
    yaml.write_text(f"kind: sft\npath: {path.name}\ntokenizer: {TINY_ASSETS}\nseq_length: 64\n")
    result = CliRunner().invoke(main, ["preprocess", "--data-config", str(yaml), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"{path}:2: invalid JSON" in result.output
    assert not (tmp_path / "out").exists()

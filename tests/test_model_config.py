"""Model configs from Hugging Face config.json and YAML: values mapped as the reference reads them, and errors
that name the file and field."""
import json

import pytest
import transformers

from mindspore_llm.common import ConfigError
from mindspore_llm.models.config import config_from_hf, config_from_yaml_section, load_config
from tests import reference


def hf_dict(config) -> dict:
    return json.loads(config.to_json_string())


def test_qwen2_config_maps_bias_and_rope():
    hf = hf_dict(transformers.Qwen2Config(**reference.QWEN2, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                            "original_max_position_embeddings": 64}))
    hf["architectures"] = ["Qwen2ForCausalLM"]
    config = config_from_hf(hf)
    assert (config.qkv_bias, config.o_bias, config.qk_norm) == (True, False, False)
    assert config.head_dim == 64 // 4
    rope = config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 64)


def test_qwen3_config_maps_head_dim_and_qk_norm():
    hf = hf_dict(transformers.Qwen3Config(**reference.QWEN3))
    hf["architectures"] = ["Qwen3ForCausalLM"]
    config = config_from_hf(hf)
    assert (config.head_dim, config.qk_norm, config.qkv_bias, config.tie_word_embeddings) == (24, True, False, True)
    assert config.rope.rope_theta == 1000000.0


def test_transformers_4_rope_scaling_spelling():
    hf = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 1e6,
          "rope_scaling": {"type": "linear", "factor": 2.0}}
    rope = config_from_hf(hf).rope
    assert (rope.rope_type, rope.rope_theta, rope.factor) == ("linear", 1e6, 2.0)


def test_heads_not_divisible_by_kv_heads_names_both_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 12, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2}))
    with pytest.raises(ConfigError, match=r"config.json.*num_attention_heads \(3\).*num_key_value_heads \(2\)"):
        load_config(tmp_path)


def test_unsupported_architecture_is_named():
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        config_from_hf({"architectures": ["LlamaForCausalLM"]}, "x/config.json")


def test_unsupported_rope_type_is_named():
    hf = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}
    with pytest.raises(ConfigError, match="rope_type.*longrope"):
        config_from_hf(hf)


def test_sliding_window_is_refused():
    hf = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "use_sliding_window": True}
    with pytest.raises(ConfigError, match="use_sliding_window"):
        config_from_hf(hf)


def test_yaml_section_rejects_unknown_and_mistyped_keys():
    section = {"architecture": "Qwen3ForCausalLM", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    assert config_from_yaml_section(section, "tiny.yaml: model").head_dim == 16
    with pytest.raises(ConfigError, match=r"tiny.yaml: model: unknown key\(s\) hidden_sise"):
        config_from_yaml_section({**section, "hidden_sise": 1}, "tiny.yaml: model")
    with pytest.raises(ConfigError, match=r"tiny.yaml: model.num_hidden_layers: expected an integer"):
        config_from_yaml_section({**section, "num_hidden_layers": "two"}, "tiny.yaml: model")
    with pytest.raises(ConfigError, match=r"head_dim must be a positive even number"):
        config_from_yaml_section({**section, "head_dim": 15}, "tiny.yaml: model")

"""Pretraining data: documents + EOD concatenated into full rows; optional position/attention reset."""
import json

import numpy as np
import pytest

from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.data import TINY_ASSETS, DataConfig, build_sequences
from mindspore_llm.tokenizer import load_tokenizer

DOCUMENTS = ["The capital of Peru is Lima.", "3 plus 4 is 7.\nSecond line of the same document.",
             "The word apple backwards is elppa.", "Goodbye."] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_ASSETS)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrain") / "docs.txt"
    path.write_text("\n\n  \n".join(DOCUMENTS) + "\n")
    return path


def config(path, **overrides):
    return DataConfig(**{"kind": "pretrain", "path": str(path), "tokenizer": str(TINY_ASSETS), "seq_length": 32,
                         "eod_token": "<|endoftext|>", **overrides})


def expected_stream(tokenizer):
    return [t for doc in DOCUMENTS for t in tokenizer.encode(doc) + [tokenizer.token_to_id("<|endoftext|>")]]


def test_documents_concatenated_with_eod_and_cut_into_rows(text_file, tokenizer):
    arrays = build_sequences(config(text_file))
    stream = expected_stream(tokenizer)
    rows = -(-len(stream) // 32)
    assert arrays["input_ids"].shape == (rows, 32)
    np.testing.assert_array_equal(arrays["input_ids"].reshape(-1)[:len(stream)], stream)
    assert (arrays["attention_mask"].reshape(-1)[len(stream):] == 0).all()


def test_jsonl_text_records_give_the_same_rows(tmp_path, text_file):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCUMENTS))
    from_jsonl, from_text = build_sequences(config(path)), build_sequences(config(text_file))
    for name in from_text:
        np.testing.assert_array_equal(from_jsonl[name], from_text[name])


def test_reset_gives_document_ids_and_positions_per_document(text_file, tokenizer):
    arrays = build_sequences(config(text_file))
    eod = tokenizer.token_to_id("<|endoftext|>")
    for row in range(len(arrays["input_ids"])):
        ids, mask, positions = (arrays[name][row] for name in ("input_ids", "attention_mask", "position_ids"))
        labels = arrays["labels"][row]
        real = mask > 0
        # a new document starts at the row start and after every EOD
        starts = np.flatnonzero(real & np.r_[True, ids[:-1] == eod])
        np.testing.assert_array_equal(mask[starts], np.arange(1, len(starts) + 1))
        np.testing.assert_array_equal(positions[starts], 0)
        steps = np.flatnonzero(real[1:] & (mask[1:] == mask[:-1])) + 1
        np.testing.assert_array_equal(positions[steps], positions[steps - 1] + 1)
        # every token is a target except a document's first: it would be predicted across the boundary
        np.testing.assert_array_equal(labels[real & ~np.isin(np.arange(32), starts)],
                                      ids[real & ~np.isin(np.arange(32), starts)])
        assert (labels[starts] == IGNORE_INDEX).all()


def test_without_reset_one_document_and_running_positions(text_file):
    arrays = build_sequences(config(text_file, reset_position_ids=False, reset_attention=False))
    full = arrays["attention_mask"][:-1]
    assert (full == 1).all()
    np.testing.assert_array_equal(arrays["position_ids"], np.broadcast_to(np.arange(32), arrays["position_ids"].shape))
    np.testing.assert_array_equal(arrays["labels"][:-1], arrays["input_ids"][:-1])


def test_eod_defaults_to_the_tokenizer_eos(text_file, tokenizer):
    arrays = build_sequences(config(text_file, eod_token=None))
    first = len(tokenizer.encode(DOCUMENTS[0]))
    assert arrays["input_ids"][0, first] == tokenizer.eos_token_id


def test_shipped_pretraining_text(tokenizer):
    arrays = build_sequences(config(TINY_ASSETS / "pretrain.txt", seq_length=256))
    assert len(arrays["input_ids"]) > 40 and (arrays["attention_mask"][:-1] > 0).all()

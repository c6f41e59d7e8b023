"""The data stream: rank sharding, deterministic epochs, resume from a sample index, MindRecord round trip."""
import itertools

import numpy as np
import pytest
from click.testing import CliRunner

from mindspore_llm.cli import main
from mindspore_llm.data import TINY_ASSETS, DataConfig, TokenDataset, build_dataset, build_sequences, shard_indices


def numbered(count, seq_length=4):
    """Sequences whose first token is their global index."""
    ids = np.arange(count, dtype=np.int32)[:, None] + np.zeros((1, seq_length), np.int32)
    return {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids),
            "position_ids": np.broadcast_to(np.arange(seq_length, dtype=np.int32), ids.shape).copy()}


def first_tokens(dataset, batch_size, start, count):
    stream = dataset.batches(batch_size, start)
    return np.concatenate([next(stream)["input_ids"][:, 0] for _ in range(count)])


@pytest.mark.parametrize("total, world_size", [(12, 4), (10, 4), (7, 2), (5, 1)])
def test_ranks_cover_every_sequence_each_epoch(total, world_size):
    arrays = numbered(total)
    shares = [shard_indices(total, rank, world_size) for rank in range(world_size)]
    datasets = [TokenDataset({name: array[rows] for name, array in arrays.items()}, shuffle=True, seed=3)
                for rows in shares]
    per_rank = -(-total // world_size)
    assert [len(d) for d in datasets] == [per_rank] * world_size
    dealt = np.arange(per_rank * world_size) % total  # round-robin, wrapping around to even out the ranks
    for epoch in range(3):
        seen = [first_tokens(d, per_rank, epoch * per_rank, 1) for d in datasets]
        for rank in range(world_size):
            assert sorted(seen[rank]) == sorted(dealt[rank::world_size])
        assert set(np.concatenate(seen)) == set(range(total))
        if total % world_size == 0:
            assert sorted(np.concatenate(seen)) == list(range(total)), "each sequence exactly once"


def test_epochs_reshuffle_deterministically():
    dataset = TokenDataset(numbered(20), shuffle=True, seed=5)
    epoch0, epoch1 = first_tokens(dataset, 20, 0, 1), first_tokens(dataset, 20, 20, 1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and list(epoch0) != list(epoch1)
    np.testing.assert_array_equal(first_tokens(TokenDataset(numbered(20), shuffle=True, seed=5), 20, 0, 1), epoch0)
    np.testing.assert_array_equal(first_tokens(TokenDataset(numbered(20), shuffle=False), 20, 0, 1), np.arange(20))


def test_resume_from_a_sample_index_continues_the_same_batches():
    """13 sequences, batch 3: the stream crosses epochs mid-batch; restarting at step 5 (sample 15) yields
    exactly the batches the uninterrupted stream yields from there."""
    arrays = build_sequences(DataConfig(kind="sft", path=str(TINY_ASSETS / "sft.jsonl"), seq_length=128,
                                        tokenizer=str(TINY_ASSETS)))
    arrays = {name: array[:13] for name, array in arrays.items()}
    uninterrupted = TokenDataset(arrays, seed=7).batches(3)
    reference = [next(uninterrupted) for _ in range(12)]
    resumed = TokenDataset(arrays, seed=7).batches(3, start=5 * 3)
    for step in range(5, 12):
        batch = next(resumed)
        for name in reference[step]:
            np.testing.assert_array_equal(batch[name], reference[step][name])


def test_mindrecord_round_trip_gives_identical_batches(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {{}}\ndata:\n  kind: sft\n  path: {TINY_ASSETS / 'sft.jsonl'}\n"
                      f"  tokenizer: {TINY_ASSETS}\n  seq_length: 256\n  packing: true\n  seed: 11\n")
    result = CliRunner().invoke(main, ["preprocess", "--data-config", str(config), "--output",
                                       str(tmp_path / "mr"), "--shards", "3"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "mr").glob("data.mindrecord?"))) == 3
    source = DataConfig(kind="sft", path=str(TINY_ASSETS / "sft.jsonl"), tokenizer=str(TINY_ASSETS),
                        seq_length=256, packing=True, seed=11)
    stored_config = DataConfig(**{**source.__dict__, "path": str(tmp_path / "mr" / "data.mindrecord1")})
    for rank in (0, 3):  # of 4: 114 sequences, rank 3's share wraps around to sequence 1
        direct, stored = build_dataset(source, rank, 4), build_dataset(stored_config, rank, 4)
        assert len(direct) == len(stored) == 29
        for a, b in itertools.islice(zip(direct.batches(4), stored.batches(4)), 10):  # 40 samples: into epoch 2
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
    mismatch = DataConfig(**{**source.__dict__, "path": str(tmp_path / "mr"), "seq_length": 128})
    with pytest.raises(ValueError, match="data.seq_length: 128 differs from 256"):
        build_dataset(mismatch)

"""Fixtures shared by the data tests: a small synthetic shard set and its tokenizer."""
import pytest

from megaclip.data.synthetic import write_synthetic_shards
from megaclip.data.tokenizer import SentencePieceTokenizer


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", image_size=32,
                                  train_samples=256, samples_per_shard=32, seed=0)


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return SentencePieceTokenizer(synthetic.tokenizer_model, context_length=16)

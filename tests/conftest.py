"""Settings for test processes running side by side (pytest-xdist, README's test command), and fixtures
shared by the data tests: a small synthetic shard set and its tokenizer."""
import os

import pytest

from megaclip.data.synthetic import write_synthetic_shards
from megaclip.data.tokenizer import SentencePieceTokenizer


def pytest_configure(config):
    """A pytest-xdist worker computes on one thread, as the runs' ranks do (OMP_NUM_THREADS=1): two
    workers on a 2-core machine share its cores instead of each spinning threads on both. (Ports need
    nothing: torchrun on one node, given no --master-port, rendezvous on a free one, and the tests'
    own process groups pick one each.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", image_size=32,
                                  train_samples=256, samples_per_shard=32, seed=0)


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return SentencePieceTokenizer(synthetic.tokenizer_model, context_length=16)

"""Settings for test processes running side by side (pytest-xdist, README's test command), and fixtures
shared by the data tests: a small synthetic shard set and its tokenizer."""
import os

import pytest

from megaclip.data.synthetic import write_synthetic_shards
from megaclip.data.tokenizer import SentencePieceTokenizer


# The files that start whole training runs, the longest first (about 90 to 30 s each on 2 cores).
# pytest-xdist hands out whole files in the collection's order (see pytest_configure): long ones
# first, so that none is left for the end while the other worker has nothing to do. A file not
# named keeps its place after them.
LONGEST_FIRST = ("test_main_job.py", "test_siglip.py", "test_preemption.py", "test_resume.py", "test_catlip.py",
                 "test_run_lock.py", "test_regularisers.py", "test_nonfinite.py", "test_stuck_rank.py")


def pytest_configure(config):
    """A pytest-xdist worker computes on one thread, as the runs' ranks do (OMP_NUM_THREADS=1): two
    workers on a 2-core machine share its cores instead of each spinning threads on both. The
    controller keeps the collection's order of files instead of its default, files with the most
    tests first. (Ports need nothing: torchrun on one node, given no --master-port, rendezvous on a
    free one, and the tests' own process groups pick one each.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    elif hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    position = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: position.get(item.path.name, len(position)))  # stable: the rest keep their order


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", image_size=32,
                                  train_samples=256, samples_per_shard=32, seed=0)


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return SentencePieceTokenizer(synthetic.tokenizer_model, context_length=16)

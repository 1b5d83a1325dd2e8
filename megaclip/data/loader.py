"""Webdataset loaders that split shards by data-parallel rank.

Under tensor parallelism several processes share one data-parallel rank and must see identical
batches, so everything a loader yields depends only on (seed, dp_rank, dp_size): shards are split
by the data-parallel rank (not the world rank), and all shuffling and augmentation draw from
random generators seeded from (seed, dp_rank, epoch, loader worker).
"""

import glob
import os
import random
import warnings
from itertools import islice

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import get_worker_info


def _named_shards(spec) -> list[str]:
    """Paths named by a brace pattern, a directory (all its .tar files) or a list of either."""
    if isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            return sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        return list(braceexpand.braceexpand(spec))
    return [path for item in spec for path in _named_shards(item)]


def expand_shards(spec) -> list[str]:
    """The existing shard files named by a brace pattern, a directory or a list of either."""
    return [path for path in _named_shards(spec) if os.path.isfile(path)]


def missing_shards(spec) -> list[str]:
    """The shard files named by spec that do not exist."""
    return [path for path in _named_shards(spec) if not os.path.isfile(path)]


def _existing_shards(spec) -> list[str]:
    missing = missing_shards(spec)
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    shards = expand_shards(spec)
    if not shards:
        raise FileNotFoundError(f"no shards found for {spec!r}")
    return shards


def _skip_bad_sample(exn: Exception) -> bool:
    """Warn and go on; unlike webdataset's warn_and_continue, without sleeping half a second each time."""
    warnings.warn(f"skipping unreadable sample: {exn!r}")
    return True


class _DataParallelSplit:
    """Node splitter keyed by the data-parallel rank; webdataset's split_by_node would use the world rank."""

    def __init__(self, dp_rank: int, dp_size: int):
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __call__(self, shards):
        return islice(shards, self.dp_rank, None, self.dp_size)


class _EpochSeeded(wds.PipelineStage):
    """A stage with a fresh random generator per epoch, seeded from (seed, epoch, worker).

    Every pass over the pipeline is one epoch. The counter lives in the stage, which stays in its
    worker process across epochs because the train loader keeps its workers alive.
    """

    def __init__(self, seed: str):
        self.seed, self.epoch = seed, -1

    def next_epoch_rng(self) -> random.Random:
        self.epoch += 1
        worker = get_worker_info()
        return random.Random(f"{self.seed}/epoch{self.epoch}/worker{worker.id if worker else 0}")


class _Shuffle(_EpochSeeded):
    def __init__(self, seed: str, buffer: int):
        super().__init__(seed)
        self.buffer = buffer

    def run(self, samples):
        return wds.shuffle(self.buffer, rng=self.next_epoch_rng())(samples)


class _Augment(_EpochSeeded):
    def __init__(self, seed: str, image_transform):
        super().__init__(seed)
        self.image_transform = image_transform

    def run(self, samples):
        rng = self.next_epoch_rng()
        for image, caption in samples:
            yield self.image_transform(image, rng), caption


class _Collate:
    def __init__(self, tokenizer, keep_captions: bool):
        self.tokenizer, self.keep_captions = tokenizer, keep_captions

    def __call__(self, samples):
        images, captions = zip(*samples)
        batch = (torch.stack(images), self.tokenizer(list(captions)))
        return (*batch, list(captions)) if self.keep_captions else batch


def build_train_loader(
    shards, *, dp_rank: int, dp_size: int, micro_batch_size: int, image_transform, tokenizer,
    num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000,
):
    """Endless (images [B,3,H,W] float32, tokens [B,ctx] long) micro-batches, epoch after epoch.

    image_transform is called as image_transform(pil_image, rng) with a seeded random.Random.
    Iterate the returned loader once: each pass over it continues with the next epochs.
    """
    urls = _existing_shards(shards)
    readers = dp_size * max(1, num_workers)
    if len(urls) < readers:
        raise ValueError(f"{len(urls)} train shards cannot feed {dp_size} data-parallel ranks x "
                         f"{max(1, num_workers)} loader workers: need at least {readers} shards")
    stream = f"seed{seed}/dp{dp_rank}"
    dataset = (
        wds.WebDataset(
            urls, handler=_skip_bad_sample, nodesplitter=_DataParallelSplit(dp_rank, dp_size),
            workersplitter=wds.split_by_worker, shardshuffle=len(urls), detshuffle=True, seed=seed,
        )
        # shuffle the encoded samples: a buffer of JPEG bytes is far smaller than of decoded images
        .compose(_Shuffle(f"{stream}/shuffle", shuffle_buffer))
        .decode("pil", handler=_skip_bad_sample)
        .to_tuple("jpg;png;webp", "txt", handler=_skip_bad_sample)
        .compose(_Augment(f"{stream}/augment", image_transform))
        .batched(micro_batch_size, collation_fn=_Collate(tokenizer, keep_captions=False), partial=False)
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)
    return loader.repeat()


def build_eval_loader(shards, *, dp_rank: int, dp_size: int, batch_size: int, image_transform, tokenizer):
    """One unshuffled pass of (images, tokens, captions) batches over this rank's shards, last batch partial.

    A rank left without shards (fewer shards than ranks) yields nothing. Each iteration is a new pass.
    """
    return (
        wds.WebDataset(
            _existing_shards(shards), handler=_skip_bad_sample,
            nodesplitter=_DataParallelSplit(dp_rank, dp_size), shardshuffle=False, empty_check=False,
        )
        .decode("pil", handler=_skip_bad_sample)
        .to_tuple("jpg;png;webp", "txt", handler=_skip_bad_sample)
        .map_tuple(image_transform, handler=_skip_bad_sample)
        .batched(batch_size, collation_fn=_Collate(tokenizer, keep_captions=True), partial=True)
    )

"""The train loader: endless, shuffled, exactly resumable batches of one data-parallel rank.

Under tensor parallelism several processes share one data-parallel rank and must see identical
batches, so everything a loader yields depends only on (seed, dp_rank, dp_size, num_workers).

Each loader worker is a reader with its own endless stream: epochs of shards (see shards.py), each
epoch read in windows of `shuffle_window` shards whose undecoded samples pass a shuffle buffer that
drains at the window's end. A sample's place in that stream, (epoch, window, index), seeds its
augmentation, so a reader resumes exactly by replaying one window's undecoded samples up to its
saved index. torch's DataLoader takes batches from its workers in strict rotation; a resumed
loader rotates its workers so that the reader whose turn came next serves first.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections import Counter
from typing import Dict, Iterator, List

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megaclip.data.samples import SKIP_KINDS, DataError, SampleDecoder, Skipped, read_shards
from megaclip.data.shards import epoch_shards, parse_sources, resampled_shards
from megaclip.guard import ignore_stop_signals

_MAX_EMPTY_EPOCHS = 20
Position = tuple  # (epoch, window, index of the next undecoded sample in the window's shuffled order)


def worker_index() -> tuple[int, int]:
    """(this loader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def dataloader(dataset, num_workers: int, prefetch_factor: int) -> DataLoader:
    """A DataLoader over a dataset that yields whole batches. It gets a generator of its own: every
    iter() draws a worker seed from its generator, which by default is torch's global one, and would
    shift the model's random stream (patch dropout, drop path) between a run and its resume. Samples are
    seeded by their position, so nothing uses that worker seed."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=prefetch_factor if num_workers else None, worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator())


class _TrainStream(IterableDataset):
    """What runs in each worker: (images, tokens, meta) batches; meta carries the reader's position
    after the batch and its cumulative skip counts to the main process."""

    def __init__(self, sources, *, resampled, seed, dp_rank, dp_size, readers, batch_size,
                 shuffle_buffer, shuffle_window, decoder, image_transform, tokenizer):
        self.sources, self.resampled, self.seed = sources, resampled, seed
        self.dp_rank, self.dp_size, self.readers, self.batch_size = dp_rank, dp_size, readers, batch_size
        self.shuffle_buffer, self.shuffle_window = shuffle_buffer, max(1, shuffle_window)
        self.decoder, self.image_transform, self.tokenizer = decoder, image_transform, tokenizer
        shard_count = sum(len(source.shards) for source in sources)
        # resampled: an epoch is as many draws as one reader's share of an epoch without replacement
        self.draws = math.ceil(shard_count / (dp_size * readers))
        # set by TrainLoader before each pass: where each reader starts, which one serves first
        self.starts: List[Position] = [(0, 0, 0)] * readers
        self.skipped: List[Dict[str, int]] = [{}] * readers
        self.first_reader = 0

    def shards(self, epoch: int, reader: int) -> list[str]:
        if self.resampled:
            return resampled_shards(self.sources, seed=self.seed, epoch=epoch, dp_rank=self.dp_rank,
                                    worker=reader, count=self.draws)
        return epoch_shards(self.sources, seed=self.seed, epoch=epoch, dp_rank=self.dp_rank,
                            dp_size=self.dp_size, worker=reader, workers=self.readers)

    def undecoded(self, reader: int, start: Position) -> Iterator[tuple[Position, dict]]:
        epoch, first_window, first_index = start
        for epoch in itertools.count(epoch):
            shards = self.shards(epoch, reader)
            for window in range(first_window, math.ceil(len(shards) / self.shuffle_window)):
                group = shards[window * self.shuffle_window:(window + 1) * self.shuffle_window]
                rng = random.Random(f"{self.seed}/shuffle/dp{self.dp_rank}/reader{reader}/epoch{epoch}/window{window}")
                samples = enumerate(wds.shuffle(self.shuffle_buffer, rng=rng)(read_shards(group)))
                # resuming mid-window: the skipped samples are read but never decoded
                for index, sample in itertools.islice(samples, first_index, None):
                    yield (epoch, window, index), sample
                first_index = 0
            first_window = 0

    def __iter__(self):
        worker, _ = worker_index()
        reader = (worker + self.first_reader) % self.readers
        counts, batch = Counter(self.skipped[reader]), []
        last_good_epoch = self.starts[reader][0]
        for (epoch, window, index), sample in self.undecoded(reader, self.starts[reader]):
            # a reader may draw only bad shards for an epoch; for many in a row, the data is unusable
            if epoch > last_good_epoch + _MAX_EMPTY_EPOCHS:
                raise DataError(f"data-parallel rank {self.dp_rank} reader {reader}: not one usable sample in "
                                   f"{_MAX_EMPTY_EPOCHS} epochs ({dict(counts)})")
            try:
                captions, _, image = self.decoder(sample)
            except Skipped as skipped:
                counts[skipped.kind] += 1
                continue
            last_good_epoch = epoch
            rng = random.Random(f"{self.seed}/augment/dp{self.dp_rank}/reader{reader}/epoch{epoch}/window{window}/{index}")
            batch.append((self.image_transform(image, rng), rng.choice(captions)))
            if len(batch) == self.batch_size:
                images, texts = zip(*batch)
                meta = {"reader": reader, "position": (epoch, window, index + 1), "skipped": dict(counts)}
                yield torch.stack(images), self.tokenizer(list(texts)), meta
                batch = []


class TrainLoader:
    """Endless (images [B,3,H,W] float32, tokens [B,ctx] long) micro-batches of one data-parallel rank.

    state_dict() is the position after the batches handed out so far; a new loader given it by
    load_state_dict() yields exactly the batches this one would have yielded next. Iterate once.
    """

    def __init__(self, stream: _TrainStream, num_workers: int, prefetch_factor: int, layout: dict):
        self.stream, self.num_workers, self.prefetch_factor = stream, num_workers, prefetch_factor
        self.layout = layout  # what a saved position is only valid for
        self.batches = 0
        self.positions: List[Position] = [(0, 0, 0)] * stream.readers
        self.skipped_by_reader: List[Dict[str, int]] = [{}] * stream.readers

    @property
    def skipped(self) -> Dict[str, int]:
        """Bad input skipped so far by this rank's readers, by kind (see samples.SKIP_KINDS)."""
        return dict(sum((Counter(c) for c in self.skipped_by_reader), Counter()))

    def __iter__(self):
        self.stream.starts, self.stream.skipped = list(self.positions), list(self.skipped_by_reader)
        self.stream.first_reader = self.batches % self.stream.readers
        for images, tokens, meta in dataloader(self.stream, self.num_workers, self.prefetch_factor):
            self.positions[meta["reader"]] = meta["position"]
            self.skipped_by_reader[meta["reader"]] = meta["skipped"]
            self.batches += 1
            yield images, tokens

    def state_dict(self) -> dict:
        return {"layout": self.layout, "batches": self.batches, "positions": [list(p) for p in self.positions],
                "skipped": [dict(c) for c in self.skipped_by_reader]}

    def load_state_dict(self, state: dict) -> None:
        if state["layout"] != self.layout:
            changed = sorted(k for k in self.layout if state["layout"].get(k) != self.layout[k])
            raise ValueError(f"saved data position is for another data layout ({', '.join(changed)} differ: "
                             f"saved {[state['layout'].get(k) for k in changed]}, now {[self.layout[k] for k in changed]})")
        self.batches = state["batches"]
        self.positions = [tuple(p) for p in state["positions"]]
        self.skipped_by_reader = [dict(c) for c in state["skipped"]]


def skipped_across_ranks(loader: TrainLoader, device, dp_group=None) -> Dict[str, int]:
    """loader.skipped summed over the data-parallel group (a collective: every rank calls it)."""
    counts = loader.skipped
    if dp_group is None or torch.distributed.get_world_size(dp_group) == 1:
        return counts
    totals = torch.tensor([counts.get(kind, 0) for kind in SKIP_KINDS], dtype=torch.long, device=device)
    torch.distributed.all_reduce(totals, group=dp_group)
    return {kind: int(n) for kind, n in zip(SKIP_KINDS, totals.tolist()) if n}


def check_sources(sources, data_cfg, dp_size: int) -> None:
    """ValueError (one line) for sources epoch mode cannot read: weights, or too few shards to give
    every data-parallel rank's every loader worker one (where open_clip hangs)."""
    if data_cfg.resampled:
        return
    readers = max(1, data_cfg.num_workers)
    if len({source.weight for source in sources}) > 1:
        raise ValueError("source weights need model.data.resampled=true: an epoch reads every shard once")
    shard_count = sum(len(source.shards) for source in sources)
    if shard_count < dp_size * readers:
        raise ValueError(f"{shard_count} train shards cannot feed {dp_size} data-parallel ranks x {readers} "
                         f"loader workers: need at least {dp_size * readers} shards (or resampled=true)")


def build_train_loader(shards, data_cfg, *, dp_rank: int, dp_size: int, micro_batch_size: int,
                       image_transform, tokenizer, seed: int) -> TrainLoader:
    """The train loader of one data-parallel rank. shards: see shards.parse_sources. data_cfg: the
    model.data config section. image_transform is called as image_transform(pil_image, rng)."""
    sources = parse_sources(shards)
    check_sources(sources, data_cfg, dp_size)
    readers = max(1, data_cfg.num_workers)
    stream = _TrainStream(
        sources, resampled=data_cfg.resampled, seed=seed, dp_rank=dp_rank, dp_size=dp_size, readers=readers,
        batch_size=micro_batch_size, shuffle_buffer=data_cfg.shuffle_buffer, shuffle_window=data_cfg.shuffle_window,
        decoder=SampleDecoder(data_cfg.image_keys, data_cfg.caption_key),
        image_transform=image_transform, tokenizer=tokenizer)
    # a digest: the shard list of a web-scale set would bloat every checkpoint
    shard_digest = hashlib.sha1(json.dumps([[s.shards, s.weight] for s in sources]).encode()).hexdigest()[:16]
    layout = {"shards": shard_digest, "resampled": data_cfg.resampled, "seed": seed, "dp_rank": dp_rank,
              "dp_size": dp_size, "readers": readers, "micro_batch_size": micro_batch_size,
              "shuffle_buffer": data_cfg.shuffle_buffer, "shuffle_window": stream.shuffle_window}
    return TrainLoader(stream, data_cfg.num_workers, data_cfg.prefetch_factor, layout)

"""The eval loader: one unshuffled pass over a data-parallel rank's share of a held-out split."""
from __future__ import annotations

from collections import Counter
from typing import Dict, Iterator, List, NamedTuple, Optional

import torch
from torch.utils.data import IterableDataset

from megaclip.data.loader import dataloader, worker_index
from megaclip.data.samples import SampleDecoder, Skipped, read_shards
from megaclip.data.shards import parse_sources


class EvalBatch(NamedTuple):
    images: torch.Tensor  # [N, 3, H, W]
    tokens: torch.Tensor  # [M, ctx], every caption of every image
    caption_image: torch.Tensor  # [M] long: the image (row of images) each caption belongs to
    captions: List[str]  # M
    labels: Optional[torch.Tensor]  # [N] long when a label key is read
    keys: List[str]  # N sample keys


class _EvalStream(IterableDataset):
    """One unshuffled pass over a rank's shards, split by worker; after its last batch each worker
    yields (None, meta) so that skips after that batch reach the main process too."""

    def __init__(self, shards, batch_size, decoder, image_transform, tokenizer):
        self.shards, self.batch_size = shards, batch_size
        self.decoder, self.image_transform, self.tokenizer = decoder, image_transform, tokenizer

    def collate(self, samples) -> EvalBatch:
        images, captions, labels, keys = zip(*samples)
        flat = [caption for image_captions in captions for caption in image_captions]
        owner = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor([len(c) for c in captions]))
        return EvalBatch(torch.stack(images), self.tokenizer(flat), owner, flat,
                         None if labels[0] is None else torch.tensor(labels), list(keys))

    def __iter__(self):
        worker, workers = worker_index()
        counts, batch = Counter(), []
        for sample in read_shards(self.shards[worker::workers]):
            try:
                captions, label, image = self.decoder(sample)
            except Skipped as skipped:
                counts[skipped.kind] += 1
                continue
            batch.append((self.image_transform(image), captions, label, sample["__key__"]))
            if len(batch) == self.batch_size:
                yield self.collate(batch), {"worker": worker, "skipped": dict(counts)}
                batch = []
        if batch:
            yield self.collate(batch), {"worker": worker, "skipped": dict(counts)}
        yield None, {"worker": worker, "skipped": dict(counts)}


class EvalLoader:
    """EvalBatches over this rank's share of the shards; each iteration is a new pass, with
    `samples` (usable samples read) and `skipped` (bad input by kind) complete once the pass ends."""

    def __init__(self, stream: _EvalStream, num_workers: int, prefetch_factor: int):
        self.stream, self.num_workers, self.prefetch_factor = stream, num_workers, prefetch_factor
        self.samples = 0
        self.skipped: Dict[str, int] = {}

    def __iter__(self) -> Iterator[EvalBatch]:
        by_worker, self.samples = {}, 0
        for batch, meta in dataloader(self.stream, self.num_workers, self.prefetch_factor):
            by_worker[meta["worker"]] = meta["skipped"]
            self.skipped = dict(sum((Counter(c) for c in by_worker.values()), Counter()))
            if batch is not None:
                self.samples += len(batch.images)
                yield batch


def build_eval_loader(shards, data_cfg, *, dp_rank: int, dp_size: int, batch_size: int, image_transform,
                      tokenizer, label_key: Optional[str] = None) -> EvalLoader:
    """Rank dp_rank's share of shards (shards[dp_rank::dp_size]; none when there are fewer shards than
    ranks), last batch partial. image_transform is called as image_transform(pil_image).

    With label_key (zero-shot classification) batches carry labels and no captions are read."""
    urls = [url for source in parse_sources(shards) for url in source.shards][dp_rank::dp_size]
    caption_key = None if label_key else data_cfg.caption_key
    decoder = SampleDecoder(data_cfg.image_keys, caption_key, label_key)
    stream = _EvalStream(urls, batch_size, decoder, image_transform, tokenizer)
    return EvalLoader(stream, min(data_cfg.num_workers, len(urls)), data_cfg.prefetch_factor)

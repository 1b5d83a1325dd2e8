"""Retrieval on a held-out split: image->text and text->image recall@k and mean rank, where an image
may have several captions (loader.EvalBatch). An image counts as retrieved within k if ANY of its
captions ranks within k; a caption, if its own image does. A wrong candidate that scores as high as
the right one ranks ahead of it.

Every data-parallel rank encodes its share and gathers all features as candidates, ranks its own
queries against them, and the per-rank totals are summed over the DP group.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.distributed as dist

RECALL_AT = (1, 5, 10)
_CHUNK = 1024  # query rows scored at once, bounding the similarity block in memory


def best_positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-scoring positive candidate: the number of negative
    candidates that do not score strictly lower. Ties (and NaN scores) count against the query, so
    features that cannot tell candidates apart, collapsed or constant, score zero, never perfect.
    scores, positive: [Q, C]."""
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1).values
    return (~(scores < best.unsqueeze(1)) & ~positive).sum(dim=1)


def _i2t_ranks(images, texts, caption_image, first_image: int) -> torch.Tensor:
    """Ranks for images numbered first_image.. among all captions; caption_image: each caption's image."""
    ranks = []
    for start in range(0, len(images), _CHUNK):
        block = images[start:start + _CHUNK]
        own = torch.arange(first_image + start, first_image + start + len(block)).unsqueeze(1)
        ranks.append(best_positive_rank(block @ texts.T, caption_image.unsqueeze(0) == own))
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


def _t2i_ranks(texts, caption_image, images) -> torch.Tensor:
    ranks = []
    for start in range(0, len(texts), _CHUNK):
        block, own = texts[start:start + _CHUNK], caption_image[start:start + _CHUNK].unsqueeze(1)
        ranks.append(best_positive_rank(block @ images.T, torch.arange(len(images)).unsqueeze(0) == own))
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


def _totals(ranks: torch.Tensor) -> list[float]:
    """[queries, sum of 1-based ranks, hits within each k of RECALL_AT]: sums, so ranks can add them up."""
    return [len(ranks), float((ranks + 1).sum()), *(float((ranks < k).sum()) for k in RECALL_AT)]


def _metrics(name: str, totals) -> Dict[str, float]:
    count, rank_sum, *hits = totals
    count = max(count, 1)
    return {**{f"{name}_R@{k}": h / count for k, h in zip(RECALL_AT, hits)}, f"{name}_mean_rank": rank_sum / count}


def _local_totals(images, texts, caption_image, all_images, all_texts, all_caption_image, first_image) -> torch.Tensor:
    i2t = _i2t_ranks(images, all_texts, all_caption_image, first_image)
    t2i = _t2i_ranks(texts, caption_image + first_image, all_images)
    return torch.tensor([*_totals(i2t), *_totals(t2i), len(images)], dtype=torch.float64)


def _from_totals(totals: torch.Tensor) -> Dict[str, float]:
    half = 2 + len(RECALL_AT)
    values = totals.tolist()
    return {**_metrics("i2t", values[:half]), **_metrics("t2i", values[half:2 * half]),
            "chance_R@1": 1.0 / max(values[-1], 1)}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      caption_image: torch.Tensor) -> Dict[str, float]:
    """Metrics of one process holding the whole split; caption_image[c] is caption c's image row."""
    images, texts = image_features.float(), text_features.float()
    return _from_totals(_local_totals(images, texts, caption_image, images, texts, caption_image, 0))


@torch.no_grad()
def encode_split(model, batches: Iterable, device: torch.device, autocast):
    """(image features [N, D], text features [M, D], caption_image [M]) of EvalBatches, on the CPU."""
    images, texts, owners, seen = [], [], [], 0
    for batch in batches:
        with autocast:
            images.append(model.encode_image(batch.images.to(device)).float().cpu())
            if len(batch.tokens):
                texts.append(model.encode_text(batch.tokens.to(device)).float().cpu())
        owners.append(batch.caption_image + seen)
        seen += len(batch.images)
    empty = torch.empty(0, model.text.text_projection.shape[1])
    return torch.cat(images or [empty]), torch.cat(texts or [empty]), torch.cat(owners or [torch.empty(0, dtype=torch.long)])


def evaluate_retrieval(model, batches: Iterable, device: torch.device, autocast, dp_group=None) -> Dict[str, float]:
    """i2t/t2i R@1/5/10 and mean rank over the whole split; every rank of dp_group calls it with its
    share of EvalBatches and gets the same result."""
    was_training = model.training
    model.eval()
    local = encode_split(model, batches, device, autocast)
    model.train(was_training)
    shares, rank = [local], 0
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        shares = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(shares, local, group=dp_group)
        rank = dist.get_rank(dp_group)
    offsets = torch.tensor([0, *(len(images) for images, _, _ in shares)]).cumsum(0)
    all_images = torch.cat([images for images, _, _ in shares])
    all_texts = torch.cat([texts for _, texts, _ in shares])
    all_owners = torch.cat([owners + offset for (_, _, owners), offset in zip(shares, offsets)])
    totals = _local_totals(*local, all_images, all_texts, all_owners, int(offsets[rank]))
    if len(shares) > 1:
        totals = totals.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(totals, group=dp_group)
    return _from_totals(totals.cpu())

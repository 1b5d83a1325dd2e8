"""Retrieval on a held-out split: image->text and text->image recall@k and mean rank, where an image
may have several captions (loader.EvalBatch). An image counts as retrieved within k if ANY of its
captions ranks within k; a caption, if its own image does. A wrong candidate that scores as high as
the right one ranks ahead of it.

Every data-parallel rank encodes its share and gathers all features as candidates, ranks its own
queries against them, and the per-rank totals are summed over the DP group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

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


@dataclass
class EncodedSplit:
    """A split's features on the CPU: images [N, D], texts [M, D], caption_image [M] (each caption's
    image row); with ``states``, what the fusion layers re-score from: the image tokens, the caption
    states and the caption token ids."""
    images: torch.Tensor
    texts: torch.Tensor
    caption_image: torch.Tensor
    image_tokens: Optional[torch.Tensor] = None
    text_states: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None


def _cat(parts, empty):
    return torch.cat(parts) if parts else empty


@torch.no_grad()
def encode_split(model, batches: Iterable, device: torch.device, autocast, states: bool = False) -> EncodedSplit:
    images, texts, owners, image_tokens, text_states, tokens, seen = [], [], [], [], [], [], 0
    for batch in batches:
        with autocast:
            if states:
                features, grid = model.visual.forward_with_tokens(batch.images.to(device))
                images.append(F.normalize(features, dim=-1).float().cpu())
                image_tokens.append(grid.cpu())  # as the tower gives them (no fp32 copy): what the fusion layers take
            else:
                images.append(model.encode_image(batch.images.to(device)).float().cpu())
            if len(batch.tokens) and states:
                features, caption_states = model.text.forward_with_states(batch.tokens.to(device))
                texts.append(F.normalize(features, dim=-1).float().cpu())
                text_states.append(caption_states.cpu())
                tokens.append(batch.tokens)
            elif len(batch.tokens):
                texts.append(model.encode_text(batch.tokens.to(device)).float().cpu())
        owners.append(batch.caption_image + seen)
        seen += len(batch.images)
    empty = torch.empty(0, model.text.text_projection.shape[1])
    split = EncodedSplit(_cat(images, empty), _cat(texts, empty), _cat(owners, torch.empty(0, dtype=torch.long)))
    if states:
        split.image_tokens, split.text_states, split.tokens = _cat(image_tokens, None), _cat(text_states, None), _cat(tokens, None)
    return split


def _joined(shares: List[EncodedSplit]):
    """The whole split from every rank's share, and where each share's images start."""
    offsets = torch.tensor([0, *(len(s.images) for s in shares)]).cumsum(0)
    whole = EncodedSplit(torch.cat([s.images for s in shares]), torch.cat([s.texts for s in shares]),
                         torch.cat([s.caption_image + offset for s, offset in zip(shares, offsets)]))
    if any(s.tokens is not None for s in shares):  # states kept (a share may have no captions: None)
        whole.image_tokens = _cat([s.image_tokens for s in shares if s.image_tokens is not None], None)
        whole.text_states = _cat([s.text_states for s in shares if s.text_states is not None], None)
        whole.tokens = _cat([s.tokens for s in shares if s.tokens is not None], None)
    return whole, offsets


def _reranked_totals(model, local: EncodedSplit, whole: EncodedSplit, first_image: int, k: int, device, autocast):
    """Totals of the re-ranked i2t and t2i ranks of this rank's queries (megaclip.rerank)."""
    from megaclip.rerank import match_scores, reranked_ranks

    def i2t(queries, candidates):  # local images against the whole split's captions
        return match_scores(model, local.image_tokens, queries, whole.text_states, whole.tokens, candidates, device, autocast)

    def t2i(queries, candidates):  # local captions against the whole split's images
        return match_scores(model, whole.image_tokens, candidates, local.text_states, local.tokens, queries, device, autocast)

    own = torch.arange(first_image, first_image + len(local.images)).unsqueeze(1)
    i2t_ranks = reranked_ranks(local.images @ whole.texts.T, whole.caption_image.unsqueeze(0) == own, k, i2t)
    owner = (local.caption_image + first_image).unsqueeze(1)
    t2i_ranks = reranked_ranks(local.texts @ whole.images.T, torch.arange(len(whole.images)).unsqueeze(0) == owner, k, t2i)
    return torch.tensor([*_totals(i2t_ranks), *_totals(t2i_ranks)], dtype=torch.float64)


def evaluate_retrieval(model, batches: Iterable, device: torch.device, autocast, dp_group=None,
                       rerank_k: int = 0) -> Dict[str, float]:
    """i2t/t2i R@1/5/10 and mean rank over the whole split; every rank of dp_group calls it with its
    share of EvalBatches and gets the same result. ``rerank_k`` > 0 (a model with fusion layers): also
    rerank_i2t_* / rerank_t2i_*, each query's contrastive top-k re-ranked by the match head, each
    rank scoring its own queries."""
    was_training = model.training
    model.eval()
    local = encode_split(model, batches, device, autocast, states=rerank_k > 0)
    shares, rank = [local], 0
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        shares = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(shares, local, group=dp_group)
        rank = dist.get_rank(dp_group)
    whole, offsets = _joined(shares)
    first_image = int(offsets[rank])
    totals = _local_totals(local.images, local.texts, local.caption_image, whole.images, whole.texts,
                           whole.caption_image, first_image)
    if rerank_k:
        totals = torch.cat([totals, _reranked_totals(model, local, whole, first_image, rerank_k, device, autocast)])
    model.train(was_training)
    if len(shares) > 1:
        totals = totals.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(totals, group=dp_group)
    totals = totals.cpu()
    metrics = _from_totals(totals[:2 * (2 + len(RECALL_AT)) + 1])
    if rerank_k:
        half = 2 + len(RECALL_AT)
        reranked = totals[2 * half + 1:].tolist()
        metrics.update({**_metrics("rerank_i2t", reranked[:half]), **_metrics("rerank_t2i", reranked[half:])})
    return metrics

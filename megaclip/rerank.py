"""Re-ranked retrieval: each query's contrastive top-k candidates re-scored by the fusion layers' image-
text matching head, the rest left in contrastive order. Cost grows with k x queries, not queries x
candidates: only the shortlists go through the fusion layers, and only where the re-ranking can change
the answer (a query whose best positive is not in its shortlist keeps its contrastive rank).

Ties count against the query as in megaclip.evaluate: a shortlist takes negatives before positives of
equal score, and within it a negative whose match score equals the best positive's ranks ahead.
"""
from __future__ import annotations

from typing import Callable

import torch

from megaclip.evaluate import best_positive_rank

PAIRS_PER_PASS = 256  # image-caption pairs through the fusion layers at once


def shortlist(scores: torch.Tensor, positive: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, min(k, C)] candidate indices: each query's k best by contrastive score, negatives before
    positives of equal score."""
    negatives_first = positive.to(torch.int8).argsort(dim=1, stable=True)
    by_score = scores.gather(1, negatives_first).argsort(dim=1, descending=True, stable=True)
    return negatives_first.gather(1, by_score[:, :k])


def reranked_ranks(scores: torch.Tensor, positive: torch.Tensor, k: int,
                   match: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """0-based rank of each query's best positive after re-ranking its top-k by ``match(queries,
    candidates)`` (flat index pairs -> match scores, higher: better). scores, positive: [Q, C]."""
    contrastive = best_positive_rank(scores, positive)
    chosen = shortlist(scores, positive, k)
    changeable = (contrastive < chosen.shape[1]).nonzero().squeeze(1)  # its best positive is in the shortlist
    ranks = contrastive.clone()
    if len(changeable):
        candidates = chosen[changeable]
        queries = changeable.unsqueeze(1).expand_as(candidates)
        scored = match(queries.reshape(-1), candidates.reshape(-1)).view_as(candidates).float()
        ranks[changeable] = best_positive_rank(scored, positive[changeable].gather(1, candidates))
    return ranks


@torch.no_grad()
def match_scores(model, image_tokens: torch.Tensor, image_rows: torch.Tensor, text_states: torch.Tensor,
                 tokens: torch.Tensor, text_rows: torch.Tensor, device: torch.device, autocast) -> torch.Tensor:
    """The match head's margin (match minus no-match logit) of each pair (``image_rows[i]`` of the image
    tokens, ``text_rows[i]`` of the caption states and tokens), on the CPU: ordered as the probability
    is, without its saturation at 1 in float (which would make ties of clear matches). The pairs' states
    are gathered a pass at a time: all k × queries of them at once would be k copies of the split's."""
    margins = []
    for start in range(0, len(image_rows), PAIRS_PER_PASS):
        images, texts = image_rows[start:start + PAIRS_PER_PASS], text_rows[start:start + PAIRS_PER_PASS]
        with autocast:
            logits = model.fusion.match_logits(image_tokens[images].to(device), text_states[texts].to(device),
                                               tokens[texts].to(device)).float()
        margins.append((logits[:, 1] - logits[:, 0]).cpu())
    return torch.cat(margins) if margins else torch.empty(0)

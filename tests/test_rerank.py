"""Re-ranked retrieval (megaclip.rerank) against a brute-force re-ranking: on a hand-made score matrix
with ties, and through evaluate_retrieval on one process and on two DP ranks with uneven shares."""
import pytest
import torch
from torch import nn

from megaclip import distributed
from megaclip.data.eval_loader import EvalBatch
from megaclip.evaluate import evaluate_retrieval
from megaclip.rerank import PAIRS_PER_PASS, match_scores, reranked_ranks
from tests.distributed import run_distributed
from tests.test_evaluation import CPU, NO_AUTOCAST, random_split
from tests.test_memory import LiveBytes


def brute_force_rank(scores, match, positive, k):
    """Sort each query's candidates: its top k by score, re-sorted by match score, then the rest by
    score; ties put negatives first. The 0-based place of its first positive."""
    ranks = []
    for q in range(len(scores)):
        by_score = sorted(range(scores.shape[1]), key=lambda c: (-scores[q, c].item(), bool(positive[q, c])))
        top = sorted(by_score[:k], key=lambda c: (-match[q, c].item(), bool(positive[q, c])))
        order = top + by_score[k:]
        ranks.append(next(i for i, c in enumerate(order) if positive[q, c]))
    return ranks


def test_reranked_ranks_on_a_hand_made_matrix_with_ties():
    scores = torch.tensor([[0.9, 0.8, 0.8, 0.1, 0.5],    # positive 2 ties a negative, in the top 3
                           [0.9, 0.8, 0.7, 0.6, 0.5],    # positive 4 outside the top 3: keeps its rank
                           [0.5, 0.5, 0.5, 0.5, 0.5],    # all tied: the positive after every negative
                           [0.1, 0.2, 0.9, 0.8, 0.3]])   # two positives
    positive = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 1, 0, 1, 0]], dtype=torch.bool)
    match = torch.tensor([[0.2, 0.9, 0.9, 0.0, 0.0],     # the positive ties a negative in match too
                          [0.0, 0.0, 0.0, 0.0, 9.0],
                          [9.0, 0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.5, 0.7, 0.0]])
    ranks = reranked_ranks(scores, positive, 3, lambda q, c: match[q, c])
    assert ranks.tolist() == [1, 4, 4, 0] == brute_force_rank(scores, match, positive, 3)
    for k in (1, 2, 5, 9):
        assert reranked_ranks(scores, positive, k, lambda q, c: match[q, c]).tolist() == brute_force_rank(scores, match, positive, k)


class MatchModel(nn.Module):
    """Stands in for a CLIPModel with fusion layers: an image is its feature row plus its global index,
    caption token t[0] picks a text feature row, and the match head reads a table of pair scores."""

    def __init__(self, text_features, table):
        super().__init__()
        self.text = nn.Module()
        self.text.text_projection = nn.Parameter(torch.zeros(1, text_features.shape[1]))
        self.text.forward_with_states = lambda tokens: (text_features[tokens[:, 0]], tokens[:, :1, None].float())
        self.visual = nn.Module()
        self.visual.forward_with_tokens = lambda images: (images[:, :-1], images.unsqueeze(1))
        self.fusion = nn.Module()
        self.fusion.match_logits = lambda grid, states, tokens: torch.stack(
            [torch.zeros(len(tokens)), table[grid[:, 0, -1].long(), states[:, 0, 0].long()]], dim=1)


def split_with_table(seed=0):
    images, texts, caption_image = random_split(seed)
    table = torch.randn(len(images), len(texts), generator=torch.Generator().manual_seed(seed + 1))
    table[caption_image, torch.arange(len(texts))] += 1.5  # the match head knows better than chance
    return images, texts, caption_image, table


def batches_of(images, caption_image, image_ids, caption_ids, size=4):
    rows = torch.cat([images, image_ids.float().unsqueeze(1)], dim=1)
    for start in range(0, len(images), size):
        mine = (caption_image >= start) & (caption_image < start + size)
        yield EvalBatch(rows[start:start + size], caption_ids[mine].unsqueeze(1), caption_image[mine] - start, None, None, None)


def expected_metrics(k):
    images, texts, caption_image, table = split_with_table()
    scores = images @ texts.T
    positive = caption_image.unsqueeze(0) == torch.arange(len(images)).unsqueeze(1)
    out = {}
    for name, ranks in (("rerank_i2t", brute_force_rank(scores, table, positive, k)),
                        ("rerank_t2i", brute_force_rank(scores.T, table.T, positive.T, k))):
        out.update({f"{name}_R@{r}": sum(x < r for x in ranks) / len(ranks) for r in (1, 5, 10)})
        out[f"{name}_mean_rank"] = sum(x + 1 for x in ranks) / len(ranks)
    return out


def _rerank_on_my_share(k):
    images, texts, caption_image, table = split_with_table()
    rank, size = distributed.dp_rank(), distributed.dp_size()
    half = len(images) // 2 + 1  # uneven shares
    first, stop = (0, half) if size == 1 or rank == 0 else (half, len(images))
    if size == 1:
        stop = len(images)
    own = (caption_image >= first) & (caption_image < stop)
    batches = batches_of(images[first:stop], caption_image[own] - first, torch.arange(first, stop), own.nonzero()[:, 0])
    return evaluate_retrieval(MatchModel(texts, table), batches, CPU, NO_AUTOCAST, distributed.dp_group(), rerank_k=k)


@pytest.mark.parametrize("k", [3, 16])
def test_evaluate_retrieval_reranks_as_brute_force_on_one_and_two_ranks(k):
    expected = expected_metrics(k)
    # random scores: no two within fp32 rounding, so the integer ranks match exactly; metrics are ratios
    for world in (1, 2):
        for metrics in run_distributed(_rerank_on_my_share, world, 1, k):
            assert {name: metrics[name] for name in expected} == pytest.approx(expected)
    assert expected["rerank_i2t_R@1"] > 0 and expected["rerank_t2i_R@1"] > 0


class PairSums(nn.Module):
    """A match head scoring a pair by the sums of its image tokens and caption states, recording how
    many pairs each pass takes."""

    def __init__(self):
        super().__init__()
        self.passes = []

    def match_logits(self, image_tokens, text_states, tokens):
        self.passes.append(len(tokens))
        return torch.stack([torch.zeros(len(tokens)), image_tokens.sum((1, 2)) - text_states.sum((1, 2))], dim=1)


def test_match_scores_gathers_the_pairs_a_pass_at_a_time():
    model = nn.Module()
    model.fusion = PairSums()
    images, states, tokens = torch.randn(10, 5, 4), torch.randn(12, 3, 4), torch.randint(0, 9, (12, 3))
    image_rows, text_rows = torch.randint(0, 10, (3 * PAIRS_PER_PASS + 7,)), torch.randint(0, 12, (3 * PAIRS_PER_PASS + 7,))
    live = LiveBytes([images, states, tokens, image_rows, text_rows])
    with live:
        margins = match_scores(model, images, image_rows, states, tokens, text_rows, CPU, NO_AUTOCAST)
    assert torch.equal(margins, images[image_rows].sum((1, 2)) - states[text_rows].sum((1, 2)))
    assert model.fusion.passes == [PAIRS_PER_PASS] * 3 + [7]
    # the pairs' states one pass at a time (and that pass's scores), not all of them: every pair's
    # image tokens and caption states at once would be 3 passes' more
    pair_bytes = (5 * 4 + 3 * 4) * 4 + 3 * 8
    assert live.peak < 2 * PAIRS_PER_PASS * pair_bytes

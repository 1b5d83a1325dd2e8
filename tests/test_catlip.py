"""CatLIP (model.loss=catlip): the BCE on class-sharded logits against torch's BCE on the whole
logits of the whole batch on one process (TP 1/2/4, DP 2, TP2xDP2)."""
import pytest
import torch
import torch.nn.functional as F

from megaclip import distributed
from megaclip.catlip_loss import catlip_loss
from megaclip.optim import average_gradients
from tests.distributed import run_distributed

CLASSES, DIM = 7, 5  # 7 classes: TP 2 and 4 pad to 8, so the padding is exercised


def problem(batch, seed=0):
    """Features, a head weight and multi-hot targets (about a third of the classes on)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, DIM, generator=g)
    weight = torch.randn(CLASSES, DIM, generator=g)
    targets = (torch.rand(batch, CLASSES, generator=g) < 0.33).float()
    return features, weight, targets


def reference(batch):
    features, weight, targets = problem(batch)
    weight.requires_grad_()
    loss = F.binary_cross_entropy_with_logits(features @ weight.T, targets, reduction="sum") / batch
    loss.backward()
    return loss.item(), weight.grad


def sharded(global_batch):
    """This rank's rows of the batch and classes of the head (zero padding rows beyond CLASSES), the
    loss, and the head's gradient DP-averaged as the optimizer does, gathered over TP."""
    features, weight, targets = problem(global_batch)
    tp, dp = distributed.tp_size(), distributed.dp_size()
    padded = -(-CLASSES // tp) * tp
    weight = torch.cat([weight, torch.zeros(padded - CLASSES, DIM)])
    local_weight = weight.chunk(tp)[distributed.tp_rank()].clone().requires_grad_()
    rows = slice(distributed.dp_rank() * global_batch // dp, (distributed.dp_rank() + 1) * global_batch // dp)
    loss = catlip_loss(features[rows] @ local_weight.T, targets[rows], CLASSES, distributed.tp_group(), distributed.dp_group())
    loss.backward()
    average_gradients([local_weight], distributed.dp_group())
    parts = [torch.empty_like(local_weight.grad) for _ in range(tp)]
    torch.distributed.all_gather(parts, local_weight.grad, group=distributed.tp_group())
    return loss.item(), torch.cat(parts)


# fp32: the sharded loss adds the same B x C terms in another order (per-rank partial sums, then the
# all-reduce), so it differs from the reference by a few ulps of the sum: relative 1e-5 leaves a
# hundredfold margin over B*C*eps for these 6 x 7 terms of size ~1. Gradients are per-element
# products with no summation across shards (DP: the mean of two local means), so the same holds.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 2), (4, 4), (2, 1), (4, 2)], ids=["tp1", "tp2", "tp4", "dp2", "tp2xdp2"])
def test_sharded_bce_equals_the_whole_loss(world, tp):
    batch = 6
    expected_loss, expected_grad = reference(batch)
    for loss, grad in run_distributed(sharded, world, tp, batch):
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        torch.testing.assert_close(grad[:CLASSES], expected_grad, **TOL)
        assert not grad[CLASSES:].any(), "the padding classes take no part in the loss"

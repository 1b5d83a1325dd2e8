"""ClipLoss against a hand-written formula, and DP=2 (batch B per rank) against one process (batch 2B)."""
import math

import pytest
import torch
import torch.nn.functional as F

from megaclip import distributed
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel
from megaclip.optim import build_optimizer
from tests.distributed import average_gradients, run_distributed
from tests.helpers import fixed_batch, full_tensors, small_config

BATCH = 4  # per DP rank


def reference_loss(image, text, scale):
    """Symmetric InfoNCE written out: -log softmax of each true pair, by rows and by columns."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(image[i] @ text[j]) for j in range(n)]
        col = [scale * float(image[j] @ text[i]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(x) for x in row)))
        total += -(col[i] - math.log(sum(math.exp(x) for x in col)))
    return total / (2 * n)


def features(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1))


def test_single_process_loss_equals_formula():
    image, text = features(6)
    scale = torch.tensor(14.0, dtype=torch.float64)
    # float64 on both sides (eps 2.2e-16), the formula without log-sum-exp's shift: exp of logits up to
    # 14 and a sum of 6 terms round at ~1e-15 relative; 1e-6 only has to tell a wrong formula apart.
    assert ClipLoss()(image, text, scale).item() == pytest.approx(reference_loss(image, text, 14.0), rel=1e-6)


def dp_feature_grads(local_loss):
    """Each rank takes its B rows of a 2B batch: its loss, its feature grads, and the DP-averaged
    grad of the (replicated) logit scale."""
    image, text = features(2 * BATCH)
    rows = slice(distributed.dp_rank() * BATCH, (distributed.dp_rank() + 1) * BATCH)
    image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    loss = ClipLoss(local_loss, gather_with_grad=True, group=distributed.dp_group())(image, text, scale)
    loss.backward()
    average_gradients([scale], distributed.dp_group())
    return loss.item(), image.grad, text.grad, scale.grad


@pytest.mark.parametrize("local_loss", [False, True])
def test_dp2_gather_with_grad_equals_global_batch(local_loss):
    image, text = features(2 * BATCH)
    image.requires_grad_(), text.requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    ref = ClipLoss()(image, text, scale)
    ref.backward()

    results = run_distributed(dp_feature_grads, 2, 1, local_loss)
    mean_loss = sum(r[0] for r in results) / 2  # the local loss differs per rank; its mean is the global loss
    # float64 features: other summation orders of 16 logits per row differ by ~1e-15 relative; the
    # 1e-9 tolerances here are six orders above that and far below any wrong gradient.
    assert mean_loss == pytest.approx(ref.item(), rel=1e-9)
    for rank, (_, g_image, g_text, g_scale) in enumerate(results):
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        # The gather's backward sums every rank's contribution: DP x the global-loss gradient, which
        # the DP average of parameter gradients divides back out.
        torch.testing.assert_close(g_image, 2 * image.grad[rows], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_text, 2 * text.grad[rows], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_scale, scale.grad, rtol=1e-6, atol=0)  # averaged in fp32


def one_training_step(global_batch):
    """Loss, grad norm and full-size gradients after the DP average, and the loss after one clipped
    AdamW step; each DP rank takes its rows of the same global batch."""
    cfg = small_config(f"tp={distributed.tp_size()}", "model.optim.grad_clip=0.05")
    distributed.seed_everything(3)
    model = CLIPModel(cfg.model)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    images, tokens = fixed_batch(cfg, global_batch)
    per_rank = global_batch // distributed.dp_size()
    rows = slice(distributed.dp_rank() * per_rank, (distributed.dp_rank() + 1) * per_rank)
    loss_fn = ClipLoss(group=distributed.dp_group())

    loss = loss_fn(*model(images[rows], tokens[rows]))
    loss.backward()
    norm = optimizer.finish_gradients(cfg.model.optim.grad_clip)
    grads = {name: grad for name, (_, grad) in full_tensors(model, cfg).items()}
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(*model(images[rows], tokens[rows]))
    return loss.item(), norm.item(), after.item(), grads


@pytest.fixture(scope="module")
def single_process_step():
    return run_distributed(one_training_step, 1, 1, 2 * BATCH)[0]


@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)], ids=["dp2", "tp2xdp2"])
def test_parallel_step_equals_single_process(single_process_step, world, tp):
    ref_loss, ref_norm, ref_after, ref_grads = single_process_step
    assert ref_norm > 0.05  # clipping is active
    for loss, norm, after, grads in run_distributed(one_training_step, world, tp, 2 * BATCH):
        # fp32 (eps 1.2e-7) in other summation orders (TP partial sums of the row linears, DP halves of
        # the batch): a gradient element sums up to ~1e4 products (batch x sequence x width), and
        # reordering it moves it by ~sqrt(n) eps ~ 1e-5 of the size of its terms, which the tensor's
        # largest gradient bounds. The loss and norm follow at 1e-5, and so does the loss after the step:
        # Adam's first update lr * g / (|g| + eps) barely moves with g's rounding unless |g| ~ eps.
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        assert after == pytest.approx(ref_after, rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5 * ref_grads[name].abs().max().item(), msg=name)

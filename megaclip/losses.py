"""Contrastive loss with features gathered over the data-parallel group.

Only DP ranks hold different samples: ranks of one TP group compute identical features, so gathering
over the whole world (as NeMo did) would count every sample TP times. With ``gather_with_grad`` the
gather is differentiable (its backward reduce-scatters), so both the global and the local loss give
exactly the gradient of the loss over the global batch once the DP gradient all-reduce averages over
ranks.

With ``block_size`` the loss is tiled: each cross-entropy is Σ_i [logsumexp_j(t x_i·y_j) − t x_i·y_i],
and the log-sum-exps are taken over blocks of rows and columns, accumulated online (Inf-CL's scheme,
on the DP group's gathered features), so the rows × columns logits never exist at once; backward
recomputes each block from the features and the saved per-row log-sum-exp. Memory then grows with the
batch linearly (features), not quadratically (logits), which is what a rank's whole batch under
gradient accumulation needs.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaclip.distributed import all_gather_into_tensor, reduce_scatter_tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward reduce-scatters (sums) the gradient.

    Hand-written because torch.distributed.nn's all_gather backward on gloo addresses subgroup ranks
    as global ranks and fails for every DP group that does not contain rank 0 (any TP > 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        local = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        reduce_scatter_tensor(local, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return local, None


def gather_features(x: torch.Tensor, group, with_grad: bool) -> torch.Tensor:
    if with_grad:
        return _AllGatherWithGrad.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach(), group=group)
    parts[dist.get_rank(group)] = x  # keep the gradient path for the local features
    return torch.cat(parts, dim=0)


class _BlockwiseLogSumExp(torch.autograd.Function):
    """Σ_i logsumexp_j(t q_i·k_j) and its gradients, block by block (``block`` rows and columns); saves
    only q, k, t and the n per-row results. Hand-written: torch's cross-entropy takes whole logits."""

    @staticmethod
    def forward(ctx, q, k, scale, block: int):
        lse = torch.full((q.shape[0],), -math.inf, dtype=q.dtype, device=q.device)
        for rows, cols in tiles(q.shape[0], k.shape[0], block):
            lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(scale * (q[rows] @ k[cols].T), dim=1))
        ctx.save_for_backward(q, k, scale, lse)
        ctx.block = block
        return lse.sum()

    @staticmethod
    def backward(ctx, grad):
        q, k, scale, lse = ctx.saved_tensors
        grad_q, grad_k, grad_scale = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(scale)
        for rows, cols in tiles(q.shape[0], k.shape[0], ctx.block):
            dots = q[rows] @ k[cols].T
            softmax = torch.exp(scale * dots - lse[rows, None]) * grad  # d/dlogits of the row's log-sum-exp
            grad_q[rows] += scale * (softmax @ k[cols])
            grad_k[cols] += scale * (softmax.T @ q[rows])
            grad_scale += (softmax * dots).sum()
        return grad_q, grad_k, grad_scale, None


def tiles(n_rows: int, n_cols: int, tile: int):
    """(rows, columns) slices of the tiles of an n_rows × n_cols matrix, the last ones cut to the edge
    (their stops are exact: SigLIP sizes its sign tiles by them); one tile when ``tile`` is 0."""
    tile = tile or max(n_rows, n_cols)
    for r in range(0, n_rows, tile):
        for c in range(0, n_cols, tile):
            yield slice(r, min(r + tile, n_rows)), slice(c, min(c + tile, n_cols))


def _cross_entropy(q, k, scale, block: int) -> torch.Tensor:
    """Mean over q's rows of the cross-entropy of logits t q·kᵀ whose true column for row i is i."""
    positives = (q * k[:q.shape[0]]).sum()
    return (_BlockwiseLogSumExp.apply(q, k, scale, block) - scale * positives) / q.shape[0]


class ClipLoss(nn.Module):
    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, group=None, block_size: int = 0):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.group = group
        self.block_size = block_size  # 0: whole logits

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        # Logits and softmax in fp32 (or better) whatever the model's precision, also under autocast
        # (which would run the logit matmuls in bf16).
        image_features, text_features, logit_scale = (
            t.to(torch.promote_types(t.dtype, torch.float32)) for t in (image_features, text_features, logit_scale))
        with torch.autocast(image_features.device.type, enabled=False):
            return self._loss(image_features, text_features, logit_scale)

    def _loss(self, image_features, text_features, logit_scale):
        world = dist.get_world_size(self.group) if dist.is_initialized() and self.group is not None else 1
        rank = dist.get_rank(self.group) if world > 1 else 0
        batch = image_features.shape[0]
        if world > 1:
            all_image = gather_features(image_features, self.group, self.gather_with_grad)
            all_text = gather_features(text_features, self.group, self.gather_with_grad)
        else:
            all_image, all_text = image_features, text_features

        if self.block_size:
            if self.local_loss:  # this rank's rows against all columns; its true pairs are columns rank·B + i
                others = lambda all_features: all_features.roll(-rank * batch, dims=0)
                return (_cross_entropy(image_features, others(all_text), logit_scale, self.block_size)
                        + _cross_entropy(text_features, others(all_image), logit_scale, self.block_size)) / 2
            return (_cross_entropy(all_image, all_text, logit_scale, self.block_size)
                    + _cross_entropy(all_text, all_image, logit_scale, self.block_size)) / 2
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            labels = torch.arange(batch, device=image_features.device) + batch * rank
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_image.shape[0], device=image_features.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

"""Contrastive loss with features gathered over the data-parallel group.

Only DP ranks hold different samples: ranks of one TP group compute identical features, so gathering
over the whole world (as NeMo did) would count every sample TP times. With ``gather_with_grad`` the
gather is differentiable (its backward reduce-scatters), so both the global and the local loss give
exactly the gradient of the loss over the global batch once the DP gradient all-reduce averages over
ranks.

With ``block_size`` the loss is tiled: each cross-entropy is Σ_i [logsumexp_j(t x_i·y_j) − t x_i·y_i],
and the log-sum-exps are taken over blocks of rows and columns, accumulated online (Inf-CL's scheme,
on the DP group's gathered features), so the rows × columns logits never exist at once. The global
loss's two directions are the rows and the columns of one matrix, so each tile's logits are computed
once (one matmul) for both; backward recomputes each tile once from the features and the saved
log-sum-exps and takes both directions' gradients from it (three matmuls per tile: the whole logits'
two plus the recomputation). The local loss's two directions are two matrices (this rank's images
against all texts, its texts against all images), each needing only its rows. Memory then grows with
the batch linearly (features), not quadratically (logits), which is what a rank's whole batch under
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
    """The log-sum-exps of the rows of the logits t q·kᵀ and, with ``columns``, of its columns (else an
    empty tensor), and their gradients, tile by tile (``block`` rows and columns): one matmul per tile
    gives both. Saves only q, k, t and the results. Hand-written: torch's cross-entropy takes whole logits."""

    @staticmethod
    def forward(ctx, q, k, scale, block: int, columns: bool):
        row_lse = torch.full((q.shape[0],), -math.inf, dtype=q.dtype, device=q.device)
        col_lse = torch.full((k.shape[0] if columns else 0,), -math.inf, dtype=q.dtype, device=q.device)
        for rows, cols in tiles(q.shape[0], k.shape[0], block):
            logits = scale * (q[rows] @ k[cols].T)
            row_lse[rows] = torch.logaddexp(row_lse[rows], torch.logsumexp(logits, dim=1))
            if columns:
                col_lse[cols] = torch.logaddexp(col_lse[cols], torch.logsumexp(logits, dim=0))
        ctx.save_for_backward(q, k, scale, row_lse, col_lse)
        ctx.block, ctx.columns = block, columns
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_rows, grad_cols):
        q, k, scale, row_lse, col_lse = ctx.saved_tensors
        grad_q, grad_k, grad_scale = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(scale)
        for rows, cols in tiles(q.shape[0], k.shape[0], ctx.block):
            logits = scale * (q[rows] @ k[cols].T)
            # d/dlogits: each row's softmax times its log-sum-exp's gradient, plus each column's
            weights = (logits - row_lse[rows, None]).exp_().mul_(grad_rows[rows, None])
            if ctx.columns:
                weights += (logits - col_lse[cols]).exp_().mul_(grad_cols[cols])
            del logits  # before the next tile's: at most three tiles alive, as the memory planner counts
            product = weights @ k[cols]
            grad_q[rows] += scale * product
            grad_k[cols] += scale * (weights.T @ q[rows])
            grad_scale += (q[rows] * product).sum()  # Σ_ij weights_ij q_i·k_j without the tile's dot products
        return grad_q, grad_k, grad_scale, None, None


def tiles(n_rows: int, n_cols: int, tile: int):
    """(rows, columns) slices of the tiles of an n_rows × n_cols matrix, the last ones cut to the edge
    (their stops are exact: SigLIP sizes its sign tiles by them); one tile when ``tile`` is 0."""
    tile = tile or max(n_rows, n_cols)
    for r in range(0, n_rows, tile):
        for c in range(0, n_cols, tile):
            yield slice(r, min(r + tile, n_rows)), slice(c, min(c + tile, n_cols))


def _tiled_loss(image_features, text_features, all_image, all_text, logit_scale, rank: int, local: bool, block: int):
    """The mean of both directions' cross-entropies from the blockwise log-sum-exps: for the global loss
    the rows and columns of the gathered features' logits; for the local loss this rank's rows of the
    two matrices, whose true pairs are the columns rank·B + i."""
    if local:
        batch = image_features.shape[0]
        mine = slice(rank * batch, (rank + 1) * batch)
        image_lse, _ = _BlockwiseLogSumExp.apply(image_features, all_text, logit_scale, block, False)
        text_lse, _ = _BlockwiseLogSumExp.apply(text_features, all_image, logit_scale, block, False)
        positives = (image_features * all_text[mine]).sum() + (text_features * all_image[mine]).sum()
    else:
        batch = all_image.shape[0]
        image_lse, text_lse = _BlockwiseLogSumExp.apply(all_image, all_text, logit_scale, block, True)
        positives = 2 * (all_image * all_text).sum()
    return (image_lse.sum() + text_lse.sum() - logit_scale * positives) / (2 * batch)


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
            return _tiled_loss(image_features, text_features, all_image, all_text, logit_scale, rank,
                               self.local_loss, self.block_size)
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            labels = torch.arange(batch, device=image_features.device) + batch * rank
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_image.shape[0], device=image_features.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

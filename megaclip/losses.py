"""Contrastive loss with features gathered over the data-parallel group.

Only DP ranks hold different samples: ranks of one TP group compute identical features, so gathering
over the whole world (as NeMo did) would count every sample TP times. ``torch.distributed.nn``'s
With ``gather_with_grad`` the gather is differentiable (its backward reduce-scatters), so both the
global and the local loss give exactly the gradient of the loss over the global batch once the DP
gradient all-reduce averages over ranks.
"""
from __future__ import annotations

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


class ClipLoss(nn.Module):
    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, group=None):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.group = group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        # Logits and softmax in fp32 (or better) whatever the model's precision.
        image_features, text_features, logit_scale = (
            t.to(torch.promote_types(t.dtype, torch.float32)) for t in (image_features, text_features, logit_scale))
        world = dist.get_world_size(self.group) if dist.is_initialized() and self.group is not None else 1
        rank = dist.get_rank(self.group) if world > 1 else 0
        batch = image_features.shape[0]
        if world > 1:
            all_image = gather_features(image_features, self.group, self.gather_with_grad)
            all_text = gather_features(text_features, self.group, self.gather_with_grad)
        else:
            all_image, all_text = image_features, text_features

        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            labels = torch.arange(batch, device=image_features.device) + batch * rank
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_image.shape[0], device=image_features.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

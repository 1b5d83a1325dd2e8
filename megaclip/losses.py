"""Contrastive loss with features gathered over the data-parallel group.

Only DP ranks hold different samples: ranks of one TP group compute identical features, so gathering
over the whole world (as NeMo did) would count every sample TP times. ``torch.distributed.nn``'s
all_gather is differentiable (its backward reduce-scatters), so with ``gather_with_grad`` both the
global and the local loss give exactly the gradient of the loss over the global batch once the DP
gradient all-reduce averages over ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


def gather_features(x: torch.Tensor, group, with_grad: bool) -> torch.Tensor:
    if with_grad:
        return torch.cat(dist_fn.all_gather(x, group=group), dim=0)
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
        # Logits and softmax in fp32 whatever the model's precision.
        image_features, text_features, logit_scale = image_features.float(), text_features.float(), logit_scale.float()
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

"""CatLIP's loss: binary cross-entropy with logits, summed over the classes and divided by the batch,
on logits split over the classes by tensor parallelism, without gathering them.

Each TP rank sums the terms of its own classes and the scalar is summed over TP. The total is
L = Σ_r l_r, so dL/d(rank r's logits) = dl_r/d(rank r's logits): the sum's backward is the identity.
Over DP, every rank's gradient must be that of its local mean, since the optimizer averages DP
gradients and the local batches are equal: the mean of the local
means is the global mean. The value is averaged over DP too, with an identity backward, so that
every rank logs, and guards against non-finite values with, the same global-batch loss, as CLIP's does.
Hand-written because torch.distributed.nn's all_reduce backward all-reduces the gradient again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _ReduceWithIdentityGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, divide: bool) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x / dist.get_world_size(group) if divide else x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def _spans(group) -> bool:
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1


def catlip_loss(local_logits: torch.Tensor, targets: torch.Tensor, tp_group=None, dp_group=None) -> torch.Tensor:
    """``local_logits``: (batch, classes / TP) of this TP rank, its classes the rank-th block (the
    class count divides by TP: megaclip.data.synset_vocab.run_vocabulary checks);
    ``targets``: (batch, classes) multi-hot over all classes."""
    width = local_logits.shape[1]
    start = dist.get_rank(tp_group) * width if _spans(tp_group) else 0
    logits = local_logits.to(torch.promote_types(local_logits.dtype, torch.float32))  # fp32 or better, always
    loss = F.binary_cross_entropy_with_logits(logits, targets[:, start:start + width].to(logits), reduction="sum")
    if _spans(tp_group):
        loss = _ReduceWithIdentityGrad.apply(loss, tp_group, False)
    loss = loss / local_logits.shape[0]
    if _spans(dp_group):
        loss = _ReduceWithIdentityGrad.apply(loss, dp_group, True)
    return loss

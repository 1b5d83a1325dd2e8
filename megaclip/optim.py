"""Optimizer, learning-rate schedule, and the gradient plumbing around them: averaging gradients over
the data-parallel group and clipping their norm over tensor- and data-parallel ranks."""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
import torch.distributed as dist
from torch import nn

from megaclip.model.parallel import is_tensor_parallel


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: biases, norms, the temperature and every tensor of rank < 2 are not decayed."""
    return param.ndim < 2 or "bias" in name or "ln_" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    # torch's fused AdamW kernel runs on CUDA and CPU alike; it is the fastest path on both.
    return torch.optim.AdamW(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                             betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=True)


def cosine_schedule(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    warmup, floor = optim_cfg.sched.warmup_steps, optim_cfg.sched.min_lr / optim_cfg.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def grads(params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def average_gradients(params: Iterable[torch.Tensor], group) -> None:
    """Average gradients over the DP group with one all-reduce of a flat fp32 buffer."""
    if group is None or dist.get_world_size(group) == 1:
        return
    gs = grads(params)
    flat = torch.cat([g.reshape(-1).float() for g in gs])
    dist.all_reduce(flat, group=group)  # gloo has no AVG, so sum and divide
    flat /= dist.get_world_size(group)
    offset = 0
    for g in gs:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, tp_group) -> torch.Tensor:
    """Clip to ``max_norm`` by the norm of the full model's gradient: TP shards summed over the TP
    group, TP-replicated tensors (identical on every TP rank) counted once."""
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device
    sharded = _squared_sum([p.grad for p in params if is_tensor_parallel(p)], device)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    total = (sharded + _squared_sum([p.grad for p in params if not is_tensor_parallel(p)], device)).sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _squared_sum(tensors: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([t.float().pow(2).sum() for t in tensors]).sum()

"""Optimizers (plain AdamW, fp32 master weights, distributed fused Adam) and the LR schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from megaclip.optim.adamw import AdamW
from megaclip.optim.distributed_adam import DistributedFusedAdam


def build_optimizer(model: nn.Module, model_cfg, dp_group=None, tp_group=None) -> torch.optim.Optimizer:
    """fused_adam: AdamW on the fp32 model, or on fp32 master weights when the model is bf16 (O2);
    distributed_fused_adam: master weights and moments sharded over the DP group (ZeRO-1).
    Either way: backward (every one but the last of an optimizer step inside ``no_sync()``;
    ``gradients_final(params)`` for parameters complete before the last), then
    ``finish_gradients(max_norm)`` (waits for the DP reduction, clips, returns the norm), then
    ``step(skip=flag)`` and ``zero_grad()``."""
    optim_cfg = model_cfg.optim
    if optim_cfg.name == "distributed_fused_adam":
        return DistributedFusedAdam(model, optim_cfg, dp_group, tp_group, shard=True)
    if model_cfg.megatron_amp_O2:
        return DistributedFusedAdam(model, optim_cfg, dp_group, tp_group, shard=False)
    return AdamW(model, optim_cfg, dp_group, tp_group)


def cosine_schedule(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    warmup, floor = optim_cfg.sched.warmup_steps, optim_cfg.sched.min_lr / optim_cfg.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)



"""Precision modes: fp32; bf16 autocast over fp32 weights; bf16 O2 (bf16 weights and activations,
fp32 master weights in the optimizer). The loss, its softmax and the logit scale stay fp32 always."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

FP32_SCALARS = ("logit_scale", "logit_bias")  # learned scalars of the objectives, fp32 under O2


def is_o2(cfg) -> bool:
    return cfg.trainer.precision == "bf16" and cfg.model.megatron_amp_O2


def prepare_model(model: nn.Module, cfg) -> nn.Module:
    """Cast to bf16 for O2, keeping the objective's scalars fp32 (the logit scale's exp multiplies
    every logit; bf16 would round SigLIP's bias of -10 in steps of 1/16)."""
    if is_o2(cfg):
        model.to(torch.bfloat16)
        for name in FP32_SCALARS:
            if hasattr(model, name):
                getattr(model, name).data = getattr(model, name).data.float()
    return model


def autocast(cfg, device: torch.device):
    """bf16 autocast over fp32 weights when precision is bf16 without O2; nothing otherwise."""
    if cfg.trainer.precision == "bf16" and not is_o2(cfg):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

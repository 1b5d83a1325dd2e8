"""Re-layout of the attention input projection between open_clip, Hugging Face and megaclip.

Every layout below is about the output rows of the q/k/v projection of a layer with ``heads`` heads of
``head_dim`` features (width = heads * head_dim); the weight has these rows and ``width`` columns,
the bias just these rows.

    stacked      open_clip's ``attn.in_proj_weight`` / ``in_proj_bias``: rows [3, heads, head_dim],
                 i.e. [Wq; Wk; Wv]. Hugging Face's separate ``q_proj`` / ``k_proj`` / ``v_proj`` are
                 its three blocks.
    per-head     megaclip's ``attn.qkv``: rows [heads, 3, head_dim], so that splitting the rows into
                 TP chunks gives each rank whole heads with their q, k and v.
"""
from __future__ import annotations

from typing import Tuple

import torch


def per_head_from_stacked(stacked: torch.Tensor, heads: int) -> torch.Tensor:
    """[Wq; Wk; Wv] (weight or bias) -> megaclip's per-head rows."""
    rest = stacked.shape[1:]
    return stacked.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(stacked.shape)


def stacked_from_per_head(per_head: torch.Tensor, heads: int) -> torch.Tensor:
    """megaclip's per-head rows (weight or bias) -> [Wq; Wk; Wv]."""
    rest = per_head.shape[1:]
    return per_head.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(per_head.shape)


def per_head_from_separate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's q, k, v projections (weights or biases) -> megaclip's per-head rows."""
    return per_head_from_stacked(torch.cat([q, k, v]), heads)


def separate_from_per_head(per_head: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megaclip's per-head rows -> Hugging Face's (q, k, v) projections, each contiguous."""
    q, k, v = stacked_from_per_head(per_head, heads).chunk(3)
    return q.contiguous(), k.contiguous(), v.contiguous()

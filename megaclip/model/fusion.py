"""Multimodal fusion layers (ALBEF, UForm): after the text tower, each layer self-attends over the
caption, cross-attends to the image tower's tokens and applies an MLP, pre-LN. On top: an image-text
matching (ITM) head on the fused end-of-text token, and captioning logits through the text tower's
token embedding (tied, so they stay split over the vocabulary across TP ranks).

The layers are the towers' own pieces (Attention, MLP from megaclip.model.transformer, stacked and
checkpointed by ParallelTransformer) plus cross-attention built the same way: every linear comes from
the ``Linears`` factory, a TP rank holds whole heads, and under sequence parallelism the caption and
the image tokens are split along the sequence between the linears.
"""
from __future__ import annotations

from typing import Optional

import torch
from omegaconf import OmegaConf
from torch import nn

# megaclip's modules first: megaclip.distributed imports megatron-core with a clear message when triton is missing
from megaclip.model.attention import attention
from megaclip.model.parallel import Linears, TorchLinear, mark_sequence_parallel, normal_init, scatter_sequence
from megaclip.model.text import pool_end_of_text
from megaclip.model.transformer import MLP, Attention, ParallelTransformer
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region


def fusion_config(model_cfg):
    """A tower config for the fusion layers: the text tower's settings (width, dropout, checkpointing),
    with model.fusion's layer count and, where set, its heads and MLP width. No stochastic depth."""
    f, t = model_cfg.fusion, model_cfg.text
    return OmegaConf.merge(t, {"num_layers": f.num_layers, "drop_path_rate": 0.0,
                               "num_attention_heads": f.num_attention_heads or t.num_attention_heads,
                               "ffn_hidden_size": f.ffn_hidden_size or t.ffn_hidden_size})


class CrossAttention(nn.Module):
    """Queries from the caption, keys and values from the image tokens (``memory``): the towers'
    attention with q and kv in two column linears (kv laid out [heads, (k, v), head_dim], so a TP shard
    owns whole heads), no mask."""

    def __init__(self, width: int, heads: int, num_layers: int, dropout: float, linears: Linears,
                 use_flash_attention: bool = False):
        super().__init__()
        self.head_dim = width // heads
        self.local_heads = heads // linears.tp
        self.dropout = dropout
        self.use_flash_attention = use_flash_attention
        std = width ** -0.5
        self.q = linears.column(width, width, normal_init(std))
        self.kv = linears.column(width, 2 * width, normal_init(std))
        self.proj = linears.row(width, width, normal_init(std * (2 * num_layers) ** -0.5))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.q(x)  # full sequences even under sequence parallelism (the column linears gather them)
        kv = self.kv(memory)
        b, s, _ = q.shape
        k, v = kv.view(b, kv.shape[1], self.local_heads, 2, self.head_dim).unbind(3)
        out = attention(q.view(b, s, self.local_heads, self.head_dim), k, v,
                        self.dropout if self.training else 0.0, False, self.use_flash_attention)
        return self.proj(out.reshape(b, s, self.local_heads * self.head_dim))


class FusionLayer(nn.Module):
    def __init__(self, cfg, causal: bool, linears: Linears):
        super().__init__()
        w, heads, flash = cfg.hidden_size, cfg.num_attention_heads, cfg.get("use_flash_attention", False)
        self.ln_1 = nn.LayerNorm(w, eps=cfg.layernorm_epsilon)
        self.attn = Attention(w, heads, cfg.num_layers, cfg.attention_dropout, causal, linears, flash)
        self.ln_cross = nn.LayerNorm(w, eps=cfg.layernorm_epsilon)
        self.cross_attn = CrossAttention(w, heads, cfg.num_layers, cfg.attention_dropout, linears, flash)
        self.ln_2 = nn.LayerNorm(w, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(w, cfg.ffn_hidden_size, cfg.num_layers, cfg.activation, linears)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        if linears.sequence_parallel:
            mark_sequence_parallel(self.ln_1, self.ln_cross, self.ln_2, self.attn.proj.bias,
                                   self.cross_attn.proj.bias, self.mlp.proj.bias)

    def forward(self, x: torch.Tensor, drop_path_scales: Optional[torch.Tensor], memory: torch.Tensor,
                causal: Optional[bool]) -> torch.Tensor:
        """``memory``: the image tokens at the text width; ``causal``: overrides the layer's mask."""
        x = x + self.dropout(self.attn(self.ln_1(x), causal))
        x = x + self.dropout(self.cross_attn(self.ln_cross(x), memory))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class FusionEncoder(nn.Module):
    """``model_cfg``: the ``model`` config section (the text width is the fusion width)."""

    def __init__(self, model_cfg, linears: Linears, eot_id: int):
        super().__init__()
        cfg = fusion_config(model_cfg)
        image_width, width = model_cfg.vision.hidden_size, cfg.hidden_size
        self.eot_id = eot_id
        self.sequence_parallel = linears.sequence_parallel
        # small and replicated, like the towers' projections
        self.image_to_text = TorchLinear(image_width, width, True, normal_init(image_width ** -0.5))
        self.transformer = ParallelTransformer(cfg, model_cfg.fusion.causal, linears, layer=FusionLayer)
        self.ln_final = nn.LayerNorm(width, eps=cfg.layernorm_epsilon)
        self.itm_head = TorchLinear(width, 2, True, normal_init(width ** -0.5))  # [no match, match]

    def forward(self, image_tokens: torch.Tensor, text_states: torch.Tensor, causal: Optional[bool] = None) -> torch.Tensor:
        """Fused caption states [b, seq, width] from the vision tower's tokens after ln_post and the
        text tower's states after ln_final; ``causal`` overrides model.fusion.causal."""
        memory = self.image_to_text(image_tokens.to(self.image_to_text.weight.dtype))
        if self.sequence_parallel:  # the vision tower's length divides by TP under sequence parallelism
            memory = scatter_sequence(memory)
        return self.ln_final(self.transformer(text_states, memory, causal))

    def pooled(self, image_tokens: torch.Tensor, text_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The fused state at each caption's end-of-text token: the multimodal embedding."""
        return pool_end_of_text(self(image_tokens, text_states), tokens, self.eot_id)

    def match_logits(self, image_tokens: torch.Tensor, text_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[b, 2] logits of (no match, match) for each image-caption pair."""
        return self.itm_head(self.pooled(image_tokens, text_states, tokens))


def caption_logits(fused: torch.Tensor, embedding_weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Next-token logits over this TP rank's part of the vocabulary, the LM head tied to the token
    embedding ``embedding_weight`` [padded vocab / tp, width]. Padding rows score -inf: how many there
    are depends on TP, and they must neither take probability mass nor learn."""
    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    if tp > 1:  # every vocabulary shard's gradient reaches the states: all-reduced in backward
        fused = copy_to_tensor_model_parallel_region(fused)
    logits = fused @ embedding_weight.to(fused.dtype).T
    first = parallel_state.get_tensor_model_parallel_rank() * embedding_weight.shape[0] if tp > 1 else 0
    padding = torch.arange(first, first + embedding_weight.shape[0], device=logits.device) >= vocab_size
    return logits.masked_fill(padding, float("-inf"))

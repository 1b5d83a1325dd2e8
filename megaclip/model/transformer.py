"""Pre-LN transformer whose attention and MLP linears come from a tensor-parallel ``Linears`` factory.

Shapes are batch-first, ``[batch, seq, hidden]``. Inside attention and the MLP each TP rank holds
``heads / tp`` whole heads and ``ffn / tp`` hidden units; the row linear all-reduces back to full width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.checkpoint import checkpoint

from megaclip.model.attention import attention
from megaclip.model.parallel import Linears, gather_sequence, mark_sequence_parallel, normal_init, scatter_sequence
from megaclip.model.regularisers import DropPath


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, num_layers: int, dropout: float, causal: bool, linears: Linears,
                 use_flash_attention: bool = False):
        super().__init__()
        self.head_dim = width // heads
        self.local_heads = heads // linears.tp
        self.dropout = dropout
        self.causal = causal
        self.use_flash_attention = use_flash_attention
        std = width ** -0.5
        # One column linear for q, k and v, its output laid out [heads, (q, k, v), head_dim] so that a
        # TP shard owns whole heads.
        self.qkv = linears.column(width, 3 * width, normal_init(std))
        self.proj = linears.row(width, width, normal_init(std * (2 * num_layers) ** -0.5))

    def forward(self, x: torch.Tensor, causal: Optional[bool] = None) -> torch.Tensor:
        """``causal`` overrides the layer's own mask for one call (the fusion layers' captioning pass)."""
        qkv = self.qkv(x)  # full sequence even under sequence parallelism (the column linear gathers it)
        b, s, _ = qkv.shape
        q, k, v = qkv.view(b, s, self.local_heads, 3, self.head_dim).unbind(3)  # each [b, s, heads, head_dim]
        causal = self.causal if causal is None else causal
        out = attention(q, k, v, self.dropout if self.training else 0.0, causal, self.use_flash_attention)
        return self.proj(out.reshape(b, s, self.local_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, width: int, ffn: int, num_layers: int, activation: str, linears: Linears):
        super().__init__()
        self.fc = linears.column(width, ffn, normal_init((2 * width) ** -0.5))
        self.act = ACTIVATIONS[activation]()
        self.proj = linears.row(ffn, width, normal_init(width ** -0.5 * (2 * num_layers) ** -0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class TransformerLayer(nn.Module):
    def __init__(self, cfg, causal: bool, linears: Linears):
        super().__init__()
        w = cfg.hidden_size
        self.ln_1 = nn.LayerNorm(w, eps=cfg.layernorm_epsilon)
        self.attn = Attention(w, cfg.num_attention_heads, cfg.num_layers, cfg.attention_dropout, causal, linears,
                              cfg.get("use_flash_attention", False))  # get: configs saved before the key existed
        self.ln_2 = nn.LayerNorm(w, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(w, cfg.ffn_hidden_size, cfg.num_layers, cfg.activation, linears)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        if linears.sequence_parallel:
            mark_sequence_parallel(self.ln_1, self.ln_2, self.attn.proj.bias, self.mlp.proj.bias)

    def forward(self, x: torch.Tensor, drop_path_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``drop_path_scales``: [2, batch, 1, 1] stochastic-depth factors of the attention and MLP branches."""
        attn_scale, mlp_scale = (None, None) if drop_path_scales is None else drop_path_scales.unbind(0)
        x = x + _scaled(self.dropout(self.attn(self.ln_1(x))), attn_scale)
        return x + _scaled(self.dropout(self.mlp(self.ln_2(x))), mlp_scale)


def _scaled(branch: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    return branch if scale is None else branch * scale.to(branch.dtype)


class ParallelTransformer(nn.Module):
    """A stack of pre-LN layers; ``cfg`` is a tower config (num_layers, hidden_size, heads, ffn,
    activation checkpointing settings). ``layer`` builds one layer (the towers' TransformerLayer, or
    the fusion layers, which take extra inputs: ``forward(x, *context)`` hands ``context`` to every layer)."""

    def __init__(self, cfg, causal: bool, linears: Linears, layer=TransformerLayer):
        super().__init__()
        self.layers = nn.ModuleList(layer(cfg, causal, linears) for _ in range(cfg.num_layers))
        self.causal = causal
        self.sequence_parallel = linears.sequence_parallel
        self.tp = linears.tp
        self.checkpoint_method = cfg.activations_checkpoint_method if cfg.activations_checkpoint_granularity else None
        self.checkpoint_layers = cfg.activations_checkpoint_num_layers
        self.drop_path = DropPath(cfg.get("drop_path_rate", 0.0), cfg.num_layers)

    def forward(self, x: torch.Tensor, *context) -> torch.Tensor:
        scales = self.drop_path.scales(x.shape[0], x.device) if self.training else None
        if not self.sequence_parallel:
            return self._layers(x, scales, context)
        length = x.shape[1]
        # Padding at the end is invisible to earlier positions under causal attention; a bidirectional
        # tower's length must divide by TP as it is (checked by the config).
        pad = (-length) % self.tp if self.causal else 0
        x = scatter_sequence(F.pad(x, (0, 0, 0, pad)))
        return gather_sequence(self._layers(x, scales, context), grad_is_partial=False)[:, :length]

    def compile_layers(self, backend: str = "inductor") -> None:
        """Compile layer by layer, in place (parameter names stay as they are): one compiled graph
        serves every layer of the tower, and the checkpointing and sequence-parallel code around the
        layers stays eager."""
        for layer in self.layers:
            layer.compile(backend=backend)

    def _layers(self, x: torch.Tensor, scales: Optional[torch.Tensor], context: tuple) -> torch.Tensor:
        """Megatron's full checkpointing: ``uniform`` recomputes every chunk of k layers from its input,
        ``block`` recomputes the first k layers one by one and keeps the rest. The recompute sees the
        same drop-path factors (inputs here); preserve_rng_state (on by default, spelled out) replays the
        generator for attention and hidden dropout."""
        k = self.checkpoint_layers
        if self.checkpoint_method == "uniform":
            for start in range(0, len(self.layers), k):
                chunk = None if scales is None else scales[start:start + k]
                x = checkpoint(_run_chunk, self.layers[start:start + k], x, chunk, context, use_reentrant=False,
                               preserve_rng_state=True)
            return x
        for i, layer in enumerate(self.layers):
            scale = None if scales is None else scales[i]
            if self.checkpoint_method == "block" and i < k:
                x = checkpoint(layer, x, scale, *context, use_reentrant=False, preserve_rng_state=True)
            else:
                x = layer(x, scale, *context)
        return x


def _run_chunk(layers: nn.ModuleList, x: torch.Tensor, scales: Optional[torch.Tensor], context: tuple) -> torch.Tensor:
    for i, layer in enumerate(layers):
        x = layer(x, None if scales is None else scales[i], *context)
    return x

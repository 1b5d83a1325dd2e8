"""Pre-LN transformer whose attention and MLP linears come from a tensor-parallel ``Linears`` factory.

Shapes are batch-first, ``[batch, seq, hidden]``. Inside attention and the MLP each TP rank holds
``heads / tp`` whole heads and ``ffn / tp`` hidden units; the row linear all-reduces back to full width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.checkpoint import checkpoint

from megaclip.model.parallel import Linears, gather_sequence, mark_sequence_parallel, normal_init, scatter_sequence


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, num_layers: int, dropout: float, causal: bool, linears: Linears):
        super().__init__()
        self.head_dim = width // heads
        self.local_heads = heads // linears.tp
        self.dropout = dropout
        self.causal = causal
        std = width ** -0.5
        # One column linear for q, k and v, its output laid out [heads, (q, k, v), head_dim] so that a
        # TP shard owns whole heads.
        self.qkv = linears.column(width, 3 * width, normal_init(std))
        self.proj = linears.row(width, width, normal_init(std * (2 * num_layers) ** -0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # full sequence even under sequence parallelism (the column linear gathers it)
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, heads, s, head_dim]
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))


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
        self.attn = Attention(w, cfg.num_attention_heads, cfg.num_layers, cfg.attention_dropout, causal, linears)
        self.ln_2 = nn.LayerNorm(w, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(w, cfg.ffn_hidden_size, cfg.num_layers, cfg.activation, linears)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        if linears.sequence_parallel:
            mark_sequence_parallel(self.ln_1, self.ln_2, self.attn.proj.bias, self.mlp.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class ParallelTransformer(nn.Module):
    """A stack of pre-LN layers; ``cfg`` is a tower config (num_layers, hidden_size, heads, ffn,
    activation checkpointing settings)."""

    def __init__(self, cfg, causal: bool, linears: Linears):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, causal, linears) for _ in range(cfg.num_layers))
        self.causal = causal
        self.sequence_parallel = linears.sequence_parallel
        self.tp = linears.tp
        self.checkpoint_method = cfg.activations_checkpoint_method if cfg.activations_checkpoint_granularity else None
        self.checkpoint_layers = cfg.activations_checkpoint_num_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return self._layers(x)
        length = x.shape[1]
        # Padding at the end is invisible to earlier positions under causal attention; a bidirectional
        # tower's length must divide by TP as it is (checked by the config).
        pad = (-length) % self.tp if self.causal else 0
        x = scatter_sequence(F.pad(x, (0, 0, 0, pad)))
        return gather_sequence(self._layers(x), grad_is_partial=False)[:, :length]

    def compile_layers(self, backend: str = "inductor") -> None:
        """Compile layer by layer, in place (parameter names stay as they are): one compiled graph
        serves every layer of the tower, and the checkpointing and sequence-parallel code around the
        layers stays eager."""
        for layer in self.layers:
            layer.compile(backend=backend)

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        """Megatron's full checkpointing: ``uniform`` recomputes every chunk of k layers from its input,
        ``block`` recomputes the first k layers one by one and keeps the rest."""
        k = self.checkpoint_layers
        if self.checkpoint_method == "uniform":
            for start in range(0, len(self.layers), k):
                x = checkpoint(_run_chunk, self.layers[start:start + k], x, use_reentrant=False)
            return x
        for i, layer in enumerate(self.layers):
            x = checkpoint(layer, x, use_reentrant=False) if self.checkpoint_method == "block" and i < k else layer(x)
        return x


def _run_chunk(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x

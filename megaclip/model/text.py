"""Text tower: vocab-parallel token embedding, learned positions, causal pre-LN blocks, final LN,
pooling at the end-of-text token, projection."""
from __future__ import annotations

import torch
from torch import nn

from megaclip.model.parallel import Linears
from megaclip.model.transformer import ParallelTransformer

PAD_ID = 0


class TextTower(nn.Module):
    def __init__(self, cfg, output_dim: int, linears: Linears):
        super().__init__()
        width = cfg.hidden_size
        self.token_embedding = linears.vocab_embedding(cfg.vocab_size, width, std=0.02)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.encoder_seq_length, width))
        self.transformer = ParallelTransformer(cfg, causal=True, linears=linears)
        self.ln_final = nn.LayerNorm(width, eps=cfg.layernorm_epsilon)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, output_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x))
        # Tokenizers put end-of-text last before the padding, so it sits at the last non-pad position.
        eot = (tokens != PAD_ID).sum(dim=1) - 1
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

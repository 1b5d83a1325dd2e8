"""Text tower: vocab-parallel token embedding, learned positions, causal pre-LN blocks, final LN,
pooling at the end-of-text token, projection."""
from __future__ import annotations

import torch
from torch import nn

from megaclip.data.tokenizer import end_of_text_id
from megaclip.model.parallel import Linears
from megaclip.model.transformer import ParallelTransformer


class TextTower(nn.Module):
    def __init__(self, cfg, output_dim: int, linears: Linears):
        super().__init__()
        width = cfg.hidden_size
        self.token_embedding = linears.vocab_embedding(cfg.vocab_size, width, std=0.02)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.encoder_seq_length, width))
        self.transformer = ParallelTransformer(cfg, causal=True, linears=linears)
        self.ln_final = nn.LayerNorm(width, eps=cfg.layernorm_epsilon)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, output_dim))
        self.eot_id = end_of_text_id(cfg.tokenizer.library)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_with_states(tokens)[0]

    def forward_with_states(self, tokens: torch.Tensor):
        """(the projected feature at the end-of-text token, every token's state after ln_final
        [b, seq, width]): the fusion layers continue from the states."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x))
        return pool_end_of_text(x, tokens, self.eot_id) @ self.text_projection, x


def pool_end_of_text(x: torch.Tensor, tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Each row's state at its first end-of-text token (the tokenizers end every row with one): where
    open_clip pools (argmax of the ids, CLIP BPE's end-of-text being its largest id) and Hugging Face
    (first eos_token_id). Not "the last non-pad token": the pad id 0 is also a real CLIP BPE token
    ("!"), and sentencepiece's end-of-text is not its largest id."""
    eot = (tokens == eot_id).int().argmax(dim=1)
    return x[torch.arange(x.shape[0], device=x.device), eot]

"""ViT image tower: conv patch embedding, class token(s), learned positions, pre-LN blocks, pooling,
projection. Only the transformer blocks are tensor-parallel; the rest is small and replicated."""
from __future__ import annotations

import torch
from torch import nn

from megaclip.model.parallel import Linears
from megaclip.model.regularisers import PatchDropout
from megaclip.model.transformer import ParallelTransformer


class VisionTower(nn.Module):
    def __init__(self, cfg, output_dim: int, linears: Linears):
        super().__init__()
        width, patch = cfg.hidden_size, cfg.patch_dim
        num_patches = (cfg.img_h // patch) * (cfg.img_w // patch)
        scale = width ** -0.5
        self.global_average_pool = cfg.global_average_pool
        self.num_class_tokens = cfg.class_token_length
        self.conv1 = nn.Conv2d(cfg.num_channels, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.class_token_length, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.class_token_length + num_patches, width))
        # Under sequence parallelism the kept tokens must split evenly over TP (get: configs saved
        # before the key existed).
        self.patch_dropout = PatchDropout(cfg.get("drop_patch_rate", 0.0), cfg.class_token_length,
                                          linears.tp if linears.sequence_parallel else 1)
        self.ln_pre = nn.LayerNorm(width, eps=cfg.layernorm_epsilon)
        self.transformer = ParallelTransformer(cfg, causal=False, linears=linears)
        self.ln_post = nn.LayerNorm(width, eps=cfg.layernorm_epsilon)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tokens(images)[0]

    def forward_with_tokens(self, images: torch.Tensor):
        """(the projected pooled feature, every token after ln_post [b, tokens, width]): the fusion
        layers cross-attend to the tokens."""
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [b, patches, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.patch_dropout(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        pooled = x[:, self.num_class_tokens:].mean(1) if self.global_average_pool else x[:, 0]
        return pooled @ self.proj, x

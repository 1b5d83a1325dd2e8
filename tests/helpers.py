"""Small models and fixed batches shared by the tests."""
from __future__ import annotations

import torch

from megaclip.config import load_config
from megaclip.model.parallel import gather_tensor_parallel

SMALL = [
    "model.vision.num_layers=2", "model.vision.hidden_size=32", "model.vision.ffn_hidden_size=64",
    "model.vision.num_attention_heads=4", "model.vision.img_h=16", "model.vision.img_w=16", "model.vision.patch_dim=8",
    "model.text.num_layers=2", "model.text.hidden_size=32", "model.text.ffn_hidden_size=64",
    "model.text.num_attention_heads=4", "model.text.encoder_seq_length=8", "model.text.vocab_size=50",
    "model.output_dim=16",
]


def small_config(*overrides: str):
    return load_config("clip_tiny", SMALL + list(overrides))


def fixed_batch(cfg, batch: int, seed: int = 0):
    """Random images and token rows [bos, words..., eos, pad...] of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.model.vision, cfg.model.text
    images = torch.randn(batch, v.num_channels, v.img_h, v.img_w, generator=g)
    tokens = torch.zeros(batch, t.encoder_seq_length, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(1, t.encoder_seq_length - 1, (1,), generator=g))
        tokens[i, 0] = 2
        tokens[i, 1:n + 1] = torch.randint(4, t.vocab_size, (n,), generator=g)
        tokens[i, n + 1] = 3
    return images, tokens


def full_tensors(model, cfg):
    """{name: (value, grad)} gathered to full size over TP; the token embedding without its padding
    rows, whose number depends on TP."""
    out = {}
    for name, p in model.named_parameters():
        value = gather_tensor_parallel(p.detach(), p)
        grad = gather_tensor_parallel(p.grad, p) if p.grad is not None else None
        if name == "text.token_embedding.weight":
            value, grad = value[: cfg.model.text.vocab_size], grad[: cfg.model.text.vocab_size] if grad is not None else None
        out[name] = (value, grad)
    return out

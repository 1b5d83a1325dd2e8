"""Zero-shot retrieval: image->text and text->image recall@k on a held-out split where image i is
paired with caption i. Each data-parallel rank encodes its share; features are gathered to all."""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.distributed as dist

RECALL_AT = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, ks=RECALL_AT) -> Dict[int, float]:
    """Fraction of rows whose diagonal entry ranks within the top k (ties count against it)."""
    correct = similarity.diagonal().unsqueeze(1)
    rank = (similarity > correct).sum(dim=1)  # how many candidates beat the true pair
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor) -> Dict[str, float]:
    similarity = image_features.float() @ text_features.float().T
    metrics = {}
    for name, sim in (("i2t", similarity), ("t2i", similarity.T)):
        for k, value in recall_at_k(sim).items():
            metrics[f"{name}_R@{k}"] = value
    metrics["chance_R@1"] = 1.0 / similarity.shape[0]
    return metrics


@torch.no_grad()
def encode_split(model, batches: Iterable, device: torch.device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    image_features, text_features = [], []
    for images, tokens, _captions in batches:
        with autocast:
            image_features.append(model.encode_image(images.to(device)).float().cpu())
            text_features.append(model.encode_text(tokens.to(device)).float().cpu())
    dim = model.text.text_projection.shape[1]
    empty = torch.empty(0, dim)
    return torch.cat(image_features or [empty]), torch.cat(text_features or [empty])


def evaluate_retrieval(model, batches: Iterable, device: torch.device, autocast, dp_group=None) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    local = encode_split(model, batches, device, autocast)
    model.train(was_training)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        shares = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(shares, local, group=dp_group)
        local = tuple(torch.cat(parts) for parts in zip(*shares))
    return retrieval_metrics(*local)

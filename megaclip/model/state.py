"""The full, TP-independent model state and its per-rank shards.

The full state is what a TP=1 model holds, with the token embedding cut to the real vocabulary (its
padding depends on TP). A TP rank's shard splits the column linears (qkv, fc) and the token embedding
along dim 0 and the row linears (attn/mlp proj) along dim 1; everything else is replicated. These are
pure functions on dicts, so converters and resharding need no process group.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from megaclip.model.parallel import gather_tensor_parallel, padded_vocab_size

State = Dict[str, torch.Tensor]
EMBEDDING = "text.token_embedding.weight"
_DIM0 = ("attn.qkv.weight", "attn.qkv.bias", "mlp.fc.weight", "mlp.fc.bias", EMBEDDING, "catlip_head.weight", "catlip_head.bias",
         "cross_attn.q.weight", "cross_attn.q.bias", "cross_attn.kv.weight", "cross_attn.kv.bias")  # fusion layers
_DIM1 = ("attn.proj.weight", "mlp.proj.weight")


def partition_dim(name: str) -> Optional[int]:
    """The dim along which parameter ``name`` is split across TP ranks, None if replicated."""
    if name.endswith(_DIM0):
        return 0
    if name.endswith(_DIM1):
        return 1
    return None


def shard_state(full: State, tp: int, rank: int) -> State:
    """Rank ``rank``'s part of the full state at TP size ``tp``."""
    out = {}
    for name, tensor in full.items():
        if name == EMBEDDING:
            tensor = _pad_rows(tensor, padded_vocab_size(tensor.shape[0], tp))
        dim = partition_dim(name)
        out[name] = tensor.chunk(tp, dim)[rank].clone() if dim is not None and tp > 1 else tensor
    return out


def unshard_state(shards: List[State], vocab_size: int) -> State:
    """The full state from the shards of every TP rank, in rank order."""
    full = {}
    for name, tensor in shards[0].items():
        dim = partition_dim(name)
        full[name] = torch.cat([s[name] for s in shards], dim) if dim is not None and len(shards) > 1 else tensor
    return _cut_embedding(full, vocab_size)


def local_state(model: nn.Module) -> State:
    """This rank's parameters by name (megatron-core's ``_extra_state`` placeholders left out)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def full_state_dict(model: nn.Module, vocab_size: int) -> State:
    """Gather the full state over the TP group (a collective: every TP rank must call it)."""
    full = {name: gather_tensor_parallel(p.detach(), p) for name, p in model.named_parameters()}
    return _cut_embedding(full, vocab_size)


def _cut_embedding(full: State, vocab_size: int) -> State:
    if EMBEDDING in full:  # CatLIP builds no text tower
        full[EMBEDDING] = full[EMBEDDING][:vocab_size]
    return full


def load_full_state_dict(model: nn.Module, full: State, tp: int, rank: int) -> None:
    """Copy this rank's shard of ``full`` into ``model``; names and shapes must match exactly."""
    load_local_state(model, shard_state(full, tp, rank))


@torch.no_grad()
def load_local_state(model: nn.Module, shard: State) -> None:
    """Copy a rank's own parameter shard into ``model`` (ValueError naming the first mismatch)."""
    params = dict(model.named_parameters())
    if shard.keys() != params.keys():
        missing, unexpected = sorted(params.keys() - shard.keys()), sorted(shard.keys() - params.keys())
        raise ValueError(f"state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, p in params.items():
        if shard[name].shape != p.shape:
            raise ValueError(f"state does not match the model: {name} has shape {tuple(shard[name].shape)}, "
                             f"the model {tuple(p.shape)}")
        p.copy_(shard[name])


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])

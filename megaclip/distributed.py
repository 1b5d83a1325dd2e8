"""Process groups and seeding: torchrun environment -> torch.distributed -> megatron-core groups.

Everything else asks this module for the tensor-parallel (TP) and data-parallel (DP) groups; world
= TP x DP, and the ranks of one TP group are consecutive (megatron-core's layout).
"""
from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

# torch 2.13 renamed the flat-tensor collectives (the old names now warn); older torch has only those.
all_gather_into_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def init(tensor_parallel_size: int, device: str = "auto") -> torch.device:
    """Start the default process group from torchrun's env and build megatron-core's groups."""
    device = pick_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def dp_group():
    return parallel_state.get_data_parallel_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def seed_everything(seed: int) -> None:
    """Same seed on every rank: weights are built full-size from it and then split, so the global
    model does not depend on TP; data order is keyed by the DP rank separately."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_coalesced(tensors, group, divide_by: int = 1) -> None:
    """Sum ``tensors`` over ``group`` in place with one collective on a flat fp32 copy (gloo has no
    AVG, so averaging is ``divide_by`` = group size)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, group=group)
    if divide_by != 1:
        flat /= divide_by
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()

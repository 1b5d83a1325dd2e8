"""Process groups and seeding: torchrun environment -> torch.distributed -> megatron-core groups.

Everything else asks this module for the tensor-parallel (TP) and data-parallel (DP) groups; world
= TP x DP, and the ranks of one TP group are consecutive (megatron-core's layout).

Every group gets the run's collective timeout, so that a stuck or dead rank ends the job instead of
hanging it: on gloo the waiting collective raises, and ``peer_failure`` turns that into one line
naming what this rank was doing (``doing``); on NCCL the watchdog ends the process
(TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default) with its own message.
"""
from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
import warnings
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
try:
    from megatron.core import parallel_state
except ModuleNotFoundError as e:  # megatron-core >= 0.18 imports triton, which CPU-only torch builds lack
    if e.name != "triton":
        raise
    raise ImportError("megatron-core >= 0.18 needs triton, which this torch build lacks: "
                      "pip install triton (it imports without a GPU), or pip install 'megatron-core<0.18'") from None

# torch 2.13 renamed the flat-tensor collectives (the old names now warn); older torch has only those.
all_gather_into_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# What this rank is doing, for the message when a collective fails: process-wide, like the groups.
_timeout_s: float = 600.0
_activity, _step = "start-up", None


def init(tensor_parallel_size: int, device: str = "auto", collective_timeout_s: float = 600.0) -> torch.device:
    """Start the default process group from torchrun's env and build megatron-core's groups, all of
    them with ``collective_timeout_s`` as the longest wait for a peer in any collective."""
    global _timeout_s
    _timeout_s = collective_timeout_s
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun
        die_with_launcher()
    device = pick_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        # megatron-core's TP linears advise CUDA_DEVICE_MAX_CONNECTIONS=1 (it orders CUDA kernels so
        # that communication overlaps compute) on the first backward; on CPU there is nothing to order.
        warnings.filterwarnings("ignore", message="When using .* it is recommended to set the environment "
                                                  "variable CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=collective_timeout_s))
    # megatron-core (0.16 to 0.20) gives its groups timedelta(minutes=distributed_timeout_minutes); a
    # new_group without one would get torch's 30-minute default, not the default group's timeout.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                             distributed_timeout_minutes=collective_timeout_s / 60)
    return device


def die_with_launcher() -> None:
    """Have the kernel kill this process when its launcher dies (Linux). torchrun starts every worker
    in a session of its own, so a launcher killed outright (SIGKILL, OOM killer) leaves its workers
    training on, unnoticed, beside whatever runs next; killed at once instead, they leave the last
    complete checkpoint as it was, as a node failure would. Elsewhere this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # one libc call: no package for it
    if os.getppid() != launcher:  # it died before the request took hold
        os.kill(os.getpid(), signal.SIGKILL)


def doing(activity: str, step: Optional[int] = None) -> None:
    """Name what this rank does from now on (e.g. "training", "evaluation"), and at which step
    (kept when None), for the message if a collective fails in it."""
    global _activity, _step
    _activity, _step = activity, _step if step is None else step


def peer_failure(error: BaseException) -> Optional[str]:
    """The one-line message for a collective that timed out or lost a peer rank; None for any other
    error. gloo raises a plain RuntimeError for both, told apart only by its text ("Timed out waiting
    600000ms for recv operation", "Connection closed by peer"; an asynchronous collective's wait:
    "Application timeout caused pair closure"); so does the store ("Socket Timeout") and NCCL with
    blocking wait ("Watchdog caught collective operation timeout")."""
    text = str(error).lower()
    where = f"{_activity}" + (f" at step {_step}" if _step is not None else "")
    if any(s in text for s in ("timed out", "socket timeout", "operation timeout", "application timeout")):
        return f"no answer from a peer rank within {_timeout_s:g} s in {where}; a rank is stuck or dead"
    if any(s in text for s in ("closed by peer", "reset by peer", "broken pipe")):
        return f"lost the connection to a peer rank in {where}; a rank stopped or died (its own message says why)"
    return None


def barrier_allowing(seconds: float) -> None:
    """A barrier for a one-off task of one rank that may take longer than the collective timeout
    (e.g. generating a data set while the others wait): its own group with its own timeout."""
    group = dist.new_group(timeout=timedelta(seconds=seconds))
    dist.barrier(group=group)
    dist.destroy_process_group(group)


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

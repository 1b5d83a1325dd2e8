"""Run a function on N CPU processes joined by gloo, as torchrun would, and collect what each returns."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback

import torch
import torch.distributed as dist

from megaclip import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(fn, world_size: int, tp: int = 1, *args, timeout: float = 600):
    """``fn(*args)`` on every rank after megaclip's process-group setup; returns results by rank."""
    # fork: the children inherit the imported torch and megatron-core instead of importing them again.
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, tp, port, queue, args)) for rank in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in procs:
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def allreduce_sequence_parallel_grads(params, tp_group) -> None:
    """Sum over TP the gradients of the parameters marked sequence-parallel, as the optimizer's gradient
    buckets do, for tests that compare gradients without building an optimizer."""
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        distributed.all_reduce_coalesced(
            [p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None], tp_group)


def average_gradients(params, group) -> None:
    """Average gradients over the DP group, as the optimizer's gradient buckets do, for tests that compare
    gradients without building an optimizer."""
    if group is not None and dist.get_world_size(group) > 1:
        distributed.all_reduce_coalesced([p.grad for p in params if p.grad is not None], group,
                                         divide_by=dist.get_world_size(group))


def _worker(fn, rank, world_size, tp, port, queue, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        distributed.init(tp, "cpu")
        buffer = io.BytesIO()  # tensors travel as bytes: shared-memory handles die with the child
        torch.save(fn(*args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        distributed.shutdown()

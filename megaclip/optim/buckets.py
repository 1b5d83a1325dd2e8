"""Gradient buckets: persistent flat fp32 gradient buffers that backward accumulates into, and their
data-parallel reduction, started bucket by bucket while backward is still running.

Parameters are grouped into buckets of one kind each (dtype, weight decay, tensor-parallel: the
optimizer treats a bucket as one tensor), at most ``bucket_size_mb`` of fp32 gradient each, taken in
reverse order of the parameters because backward reaches the last layers first. Each parameter's
``main_grad`` (Megatron's name) is a view into its bucket's fp32 buffer; an fp32 parameter's ``.grad``
is that same view (autograd adds into it in place), a bf16 parameter's gradient is added into it by a
post-accumulate-grad hook and dropped, so no full-size bf16 gradient and no fp32 copy of all of them
ever exist. The same hook marks the parameter ready; when every parameter of a bucket is, its
collective starts asynchronously: an all-reduce, or with ``shard`` a reduce-scatter in place into this
rank's shard of the buffer. ``reduce()`` starts whatever has not started (parameters that got no
gradient, or everything when overlap is off) and waits. Buckets start strictly in their order, which
is the same on every rank (collectives must be issued in the same order everywhere); a bucket that is
ready early waits for the ones before it.

Written here rather than taken from megatron-core because its DistributedDataParallel and buffers
allocate on CUDA only; this runs on gloo too, so the CPU tests prove it equal to the plain path.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Hashable, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn

from megaclip.distributed import all_reduce_coalesced, reduce_scatter_tensor
from megaclip.model.parallel import is_tensor_parallel


def bucket_layout(kinds_and_sizes: Sequence[Tuple[Hashable, int]], cap_elements: int) -> List[List[int]]:
    """Indices into ``kinds_and_sizes`` (one entry per parameter, in the model's order) of each
    bucket, in the order the buckets become ready in backward. Walking the parameters backwards, each
    kind fills its open bucket until it holds ``cap_elements``; a bucket is ready when its earliest
    parameter (the last one backward reaches) is, so the buckets still open at the end are ordered by it.
    The memory planner calls this with the model's shapes, so both agree on the padding per bucket."""
    closed, open_buckets = [], {}
    for index in reversed(range(len(kinds_and_sizes))):
        kind, size = kinds_and_sizes[index]
        members, total = open_buckets.pop(kind, ([], 0))
        members.append(index)
        if total + size >= cap_elements:
            closed.append(members)
        else:
            open_buckets[kind] = (members, total + size)
    return closed + sorted((m for m, _ in open_buckets.values()), key=lambda m: -m[-1])


@dataclass
class Bucket:
    params: List[Tuple[str, nn.Parameter]]
    grad: torch.Tensor  # fp32, padded to a multiple of the shard count
    shard: slice  # this rank's range of the buffer: the reduced gradient lands there
    ready: Set[int] = field(default_factory=set)  # ids of the parameters whose gradient is final
    work: Optional[dist.Work] = None  # the running collective
    started: bool = False
    tensor_parallel: bool = False  # its parameters are TP shards (their squares are summed over TP)
    data: Optional[torch.Tensor] = None  # flat weights in the model dtype (distributed optimizer)
    master: Optional[nn.Parameter] = None  # fp32 master weights of the shard (distributed optimizer)

    def ranges(self):
        """(name, param, start, end) of every parameter in the flat buffer."""
        start = 0
        for name, p in self.params:
            yield name, p, start, start + p.numel()
            start += p.numel()

    @property
    def reduced(self) -> torch.Tensor:
        return self.grad[self.shard]


class GradientBuckets:
    def __init__(self, named_params: Sequence[Tuple[str, nn.Parameter]], kind, *, dp_group, tp_group,
                 shard: bool, bucket_size_mb: float, overlap: bool):
        """``kind(name, param)``: the key a bucket must share. ``shard``: reduce-scatter over DP (each
        rank keeps its shard of every bucket) instead of all-reduce."""
        self.dp_group, self.tp_group, self.overlap = dp_group, tp_group, overlap
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.num_shards, self.shard_index = (self.dp, dist.get_rank(dp_group)) if shard and self.dp > 1 else (1, 0)
        cap = max(1, int(bucket_size_mb * 2 ** 20 / 4))
        layout = bucket_layout([(kind(n, p), p.numel()) for n, p in named_params], cap)
        self.buckets = [self._new_bucket([named_params[i] for i in members]) for members in layout]
        self.syncing = True  # False inside no_sync(): gradients accumulate, nothing is reduced
        self._next = 0  # the first bucket not started
        self._owner = {id(p): b for b in self.buckets for _, p in b.params}
        device = self.buckets[0].grad.device
        self._tp_mask = torch.tensor([float(b.tensor_parallel) for b in self.buckets], device=device)
        for b in self.buckets:
            for _, p in b.params:
                if hasattr(p, "gradient_hook"):  # a model serves one optimizer's buckets: the last built
                    p.gradient_hook.remove()
                p.gradient_hook = p.register_post_accumulate_grad_hook(self._gradient_ready)

    @torch.no_grad()
    def _new_bucket(self, params) -> Bucket:
        numel = sum(p.numel() for _, p in params)
        padded = math.ceil(numel / self.num_shards) * self.num_shards
        size = padded // self.num_shards
        bucket = Bucket(params, torch.zeros(padded, dtype=torch.float32, device=params[0][1].device),
                        slice(self.shard_index * size, (self.shard_index + 1) * size),
                        tensor_parallel=is_tensor_parallel(params[0][1]))
        for _, p, start, end in bucket.ranges():
            p.main_grad = bucket.grad[start:end].view_as(p)
            if p.grad is not None:  # a gradient from before the optimizer existed is kept
                p.main_grad.copy_(p.grad)
            p.grad = p.main_grad if p.dtype == torch.float32 else None
        return bucket

    @torch.no_grad()
    def _gradient_ready(self, p: nn.Parameter) -> None:
        bucket = self._owner[id(p)]
        if bucket.started:  # inside no_sync too: the collective may be reading the buffer right now
            raise RuntimeError("a gradient arrived after its bucket's reduction had started: run every backward "
                               "but the last of an optimizer step inside optimizer.no_sync(), and hand "
                               "optimizer.gradients_final only parameters no later backward reaches")
        if p.grad is not None and p.grad.data_ptr() != p.main_grad.data_ptr():
            p.main_grad.add_(p.grad)  # a bf16 gradient, or a .grad someone replaced: keep the sum in fp32
            p.grad = p.main_grad if p.dtype == torch.float32 else None
        if not (self.syncing and self.overlap):
            return
        bucket.ready.add(id(p))
        self._start_ready()

    @torch.no_grad()
    def mark_final(self, params) -> None:
        """These parameters' gradients are complete for this optimizer step (no later backward reaches
        them): count them ready, so that their buckets need not wait for ``reduce()``. A gradient that
        still arrives for one after its bucket started is refused by the hook, as above."""
        if not self.overlap:
            return
        for p in params:
            self._owner[id(p)].ready.add(id(p))
        self._start_ready()

    def _start_ready(self) -> None:
        while self._next < len(self.buckets) and len(self.buckets[self._next].ready) == len(self.buckets[self._next].params):
            self._start(self.buckets[self._next])

    def _start(self, bucket: Bucket) -> None:
        """Sum the sequence-parallel gradients over TP (the TP ranks hold parts of one batch), then start
        the DP collective. In order: the next bucket is the one after this."""
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            all_reduce_coalesced([p.main_grad for _, p in bucket.params if getattr(p, "sequence_parallel", False)],
                                 self.tp_group)
        if self.num_shards > 1:
            # in place: NCCL reads the whole buffer and writes this rank's shard of it, as megatron-core does
            bucket.work = reduce_scatter_tensor(bucket.reduced, bucket.grad, op=dist.ReduceOp.SUM,
                                                group=self.dp_group, async_op=True)
        elif self.dp > 1:
            bucket.work = dist.all_reduce(bucket.grad, group=self.dp_group, async_op=True)
        bucket.started = True
        self._next += 1

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate gradients (micro steps before the last)."""
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    @torch.no_grad()
    def reduce(self) -> List[torch.Tensor]:
        """Finish every bucket's reduction; return each bucket's averaged fp32 gradient region (its
        shard when sharded)."""
        while self._next < len(self.buckets):
            self._start(self.buckets[self._next])
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
            if self.dp > 1:
                b.reduced.div_(self.dp)  # gloo has no AVG
        return [b.reduced for b in self.buckets]

    @torch.no_grad()
    def norm(self) -> torch.Tensor:
        """The norm of the whole model's reduced gradient: TP shards summed over the TP group, TP-
        replicated buckets (the same on every TP rank) counted once, DP shards summed over DP. Computed
        on the device (no host sync) without a squared copy of any bucket."""
        squares = torch.stack([torch.linalg.vector_norm(b.reduced) for b in self.buckets]).pow(2)
        sums = torch.stack([(squares * self._tp_mask).sum(), (squares * (1 - self._tp_mask)).sum()])
        if self.num_shards > 1:
            dist.all_reduce(sums, group=self.dp_group)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(sums[:1], group=self.tp_group)
        return sums.sum().sqrt()

    @torch.no_grad()
    def zero(self) -> None:
        for b in self.buckets:
            b.grad.zero_()
            b.ready.clear()
            b.started = False
        self._next = 0

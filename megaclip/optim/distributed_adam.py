"""Distributed fused Adam (ZeRO-1) and fp32 master weights for bf16 O2.

Parameters are packed into contiguous buckets, one per (dtype, weight decay, tensor-parallel), and
become views into them; their ``.grad`` are views into matching gradient buffers that backward fills
in place. After backward each bucket's gradient is reduce-scattered in fp32 over the data-parallel
group, so every DP rank holds the averaged gradient of one contiguous shard. That rank owns the fp32
master weights and Adam moments of its shard only, updates them with torch's AdamW (the fused
kernel), and all-gathers the updated shards back into the model's (bf16 or fp32) weights.

With ``shard=False`` the same class keeps a full fp32 master copy on every rank and all-reduces the
gradients instead: the plain optimizer for bf16 O2.

Written here rather than taken from megatron-core because its DistributedOptimizer and DDP buffers
allocate on CUDA only; this runs on gloo too, so the CPU tests prove it equal to plain AdamW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

from megaclip.distributed import all_gather_into_tensor, reduce_scatter_tensor

from megaclip.model.parallel import allreduce_sequence_parallel_grads, is_tensor_parallel
from megaclip.optim.adamw import MOMENTS, new_adam_state, no_weight_decay


@dataclass
class Bucket:
    params: List[Tuple[str, nn.Parameter]]
    weight_decay: bool
    tensor_parallel: bool
    data: torch.Tensor  # flat model weights, padded to a multiple of the shard count
    grad: torch.Tensor  # flat gradients in the model dtype
    shard: slice  # this rank's range of the flat buffers
    master: nn.Parameter  # fp32 master weights of the shard; .grad holds the reduced fp32 gradient

    def ranges(self):
        """(name, param, start, end) of every parameter in the flat buffer."""
        start = 0
        for name, p in self.params:
            yield name, p, start, start + p.numel()
            start += p.numel()


class DistributedFusedAdam(torch.optim.AdamW):
    def __init__(self, model: nn.Module, optim_cfg, dp_group, tp_group, shard: bool = True):
        self.dp_group, self.tp_group = dp_group, tp_group
        dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp = dp
        self.num_shards, self.shard_index = (dp, dist.get_rank(dp_group)) if shard and dp > 1 else (1, 0)
        self.buckets = self._build_buckets(model)
        self.state_is_sharded = self.num_shards > 1
        groups = [{"params": [b.master], "weight_decay": optim_cfg.weight_decay if b.weight_decay else 0.0}
                  for b in self.buckets]
        super().__init__(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=True)

    def _build_buckets(self, model: nn.Module) -> List[Bucket]:
        keyed: Dict[tuple, List[Tuple[str, nn.Parameter]]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                keyed.setdefault((p.dtype, not no_weight_decay(name, p), is_tensor_parallel(p)), []).append((name, p))
        buckets = []
        for (dtype, decay, tp), params in keyed.items():
            numel = sum(p.numel() for _, p in params)
            padded = math.ceil(numel / self.num_shards) * self.num_shards
            device = params[0][1].device
            data = torch.zeros(padded, dtype=dtype, device=device)
            grad = torch.zeros(padded, dtype=dtype, device=device)
            size = padded // self.num_shards
            shard = slice(self.shard_index * size, (self.shard_index + 1) * size)
            bucket = Bucket(params, decay, tp, data, grad, shard,
                            nn.Parameter(torch.empty(0, device=device)))
            for _, p, start, end in bucket.ranges():
                data[start:end].copy_(p.detach().reshape(-1))
                p.data = data[start:end].view_as(p)
                p.grad = grad[start:end].view_as(p)
            bucket.master = nn.Parameter(data[shard].detach().float().clone())
            buckets.append(bucket)
        return buckets

    @torch.no_grad()
    def finish_gradients(self, max_norm: float) -> torch.Tensor:
        """Average the gradients over DP into each rank's shard, clip by the global norm, return it."""
        allreduce_sequence_parallel_grads([p for b in self.buckets for _, p in b.params], self.tp_group)
        tp_sq, replicated_sq = (torch.zeros((), device=self.buckets[0].data.device) for _ in range(2))
        for b in self.buckets:
            full = b.grad.float()
            if self.num_shards > 1:
                reduced = torch.empty(b.shard.stop - b.shard.start, device=full.device)
                reduce_scatter_tensor(reduced, full, op=dist.ReduceOp.SUM, group=self.dp_group)
            else:
                reduced = full  # may alias the gradient buffer: it is zeroed before the next backward
                if self.dp > 1:
                    dist.all_reduce(reduced, group=self.dp_group)
            reduced /= self.dp
            b.master.grad = reduced
            sq = reduced.pow(2).sum()
            if b.tensor_parallel:
                tp_sq += sq
            else:
                replicated_sq += sq
        sums = torch.stack([tp_sq, replicated_sq])
        if self.num_shards > 1:
            dist.all_reduce(sums, group=self.dp_group)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(sums[:1], group=self.tp_group)
        norm = sums.sum().sqrt()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([b.master for b in self.buckets], max_norm, norm)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for b in self.buckets:
            b.data[b.shard].copy_(b.master)
            if self.num_shards > 1:
                all_gather_into_tensor(b.data, b.data[b.shard].clone(), group=self.dp_group)

    def zero_grad(self, set_to_none: bool = True):
        """Zero the gradient buffers in place: the parameters' .grad must stay views into them."""
        for b in self.buckets:
            b.grad.zero_()
            b.master.grad = None

    def state_slices(self, model: nn.Module = None) -> dict:
        """This rank's fp32 master weights and moments by parameter name, each entry the element range
        of the (flattened, TP-local) parameter that the shard covers."""
        out = {}
        for b in self.buckets:
            st = self.state.get(b.master, {})
            for name, p, start, end in b.ranges():
                lo, hi = max(start, b.shard.start), min(end, b.shard.stop)
                if lo < hi:
                    part = slice(lo - b.shard.start, hi - b.shard.start)
                    out[name] = {"range": (lo - start, hi - start), "shape": tuple(p.shape),
                                 "master": b.master.detach()[part].clone(), **{k: st[k][part].clone() for k in MOMENTS if k in st}}
        return out

    @torch.no_grad()
    def load_state_slices(self, model: nn.Module, lookup, step: int) -> None:
        """Fill this rank's shard from ``lookup(name) -> {key: flattened TP-local tensor}``; a state
        without master weights (saved by plain AdamW) takes them from the parameters."""
        for b in self.buckets:
            st = self.state[b.master] = new_adam_state(b.master, step)
            for name, p, start, end in b.ranges():
                lo, hi = max(start, b.shard.start), min(end, b.shard.stop)
                if lo >= hi:
                    continue
                found, part, src = lookup(name), slice(lo - b.shard.start, hi - b.shard.start), slice(lo - start, hi - start)
                b.master[part] = found["master"][src] if "master" in found else p.detach().reshape(-1)[src].float()
                for k in MOMENTS:
                    st[k][part] = found[k][src]

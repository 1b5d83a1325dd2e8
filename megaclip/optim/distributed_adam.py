"""Distributed fused Adam (ZeRO-1) and fp32 master weights for bf16 O2.

Parameters are packed into the gradient buckets' layout (megaclip.optim.buckets: each bucket one
kind of parameter, at most model.optim.bucket_size_mb) and become views into a flat weight buffer per
bucket. Each bucket's fp32 gradient is reduce-scattered over the data-parallel group as soon as
backward has produced all of it, so every DP rank holds the averaged gradient of one contiguous shard
of every bucket. That rank owns the fp32 master weights and Adam moments of its shards only, updates
them with torch's AdamW (the fused kernel), and all-gathers the updated shards back into the model's
(bf16 or fp32) weights.

With ``shard=False`` the same class keeps a full fp32 master copy on every rank and all-reduces the
gradients instead: the plain optimizer for bf16 O2.

Written here rather than taken from megatron-core because its DistributedOptimizer and DDP buffers
allocate on CUDA only; this runs on gloo too, so the CPU tests prove it equal to plain AdamW.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Set

import torch
import torch.distributed as dist
from torch import nn

from megaclip.distributed import all_gather_into_tensor
from megaclip.optim.adamw import MOMENTS, BucketedAdamW, bucket_kind, gradient_buckets, new_adam_state


class DistributedFusedAdam(BucketedAdamW, torch.optim.AdamW):
    def __init__(self, model: nn.Module, optim_cfg, dp_group, tp_group, shard: bool = True):
        self.dp_group, self.tp_group = dp_group, tp_group
        self.gradients = gradient_buckets(model, optim_cfg, dp_group, tp_group, shard)
        self.buckets = self.gradients.buckets
        self.num_shards = self.gradients.num_shards
        self.state_is_sharded = self.num_shards > 1
        for b in self.buckets:
            self._pack_weights(b)
        groups = [{"params": [b.master], "weight_decay": optim_cfg.weight_decay if bucket_kind(*b.params[0])[1] else 0.0}
                  for b in self.buckets]
        super().__init__(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=True)
        self.gathering: Dict[int, dist.Work] = {}  # bucket index -> its all-gather, still running
        self.overlap_param_sync = optim_cfg.overlap_param_sync and self.num_shards > 1
        self._waited_in_step = self._wait_before_forward(model) if self.overlap_param_sync else set()

    def _wait_before_forward(self, model: nn.Module) -> Set[int]:
        """Forward pre-hooks that wait for the all-gathers of the buckets holding a module's own weights:
        on that module, or, inside a layer compiled whole (trainer.compile), on the compiled layer's
        caller (the first ancestor whose forward runs: a ModuleList's never does), outside the compiled code. Returns the buckets of the root's own parameters (the
        objective's scalars, read outside any forward: by the loss, by the clamp): step() waits for those."""
        bucket_of = {id(p): i for i, b in enumerate(self.buckets) for _, p in b.params}
        parent = {child: module for module in model.modules() for child in module.children()}
        waits: Dict[nn.Module, Set[int]] = {}
        for module in model.modules():
            own = {bucket_of[id(p)] for p in module.parameters(recurse=False) if id(p) in bucket_of}
            target, up = module, module
            while up in parent:
                if getattr(up, "_compiled_call_impl", None) is not None:
                    target = parent[up]
                up = parent[up]
            while isinstance(target, (nn.ModuleList, nn.ModuleDict)):  # containers are never called
                target = parent[target]
            if own:
                waits.setdefault(target, set()).update(own)
        in_step = waits.pop(model, set())
        for module, buckets in waits.items():
            module.register_forward_pre_hook(functools.partial(self._wait_for_gathers, buckets))
        return in_step

    def _wait_for_gathers(self, buckets, *_hook_args) -> None:
        for i in buckets:
            work = self.gathering.pop(i, None)
            if work is not None:
                work.wait()

    def wait_for_params(self) -> None:
        """Wait for every all-gather still running: before the weights are read outside a forward."""
        self._wait_for_gathers(list(self.gathering))

    @staticmethod
    @torch.no_grad()
    def _pack_weights(b) -> None:
        """Make the bucket's parameters views into one flat weight buffer laid out as its gradients,
        and take the fp32 master weights of this rank's shard from it."""
        b.data = torch.zeros(b.grad.numel(), dtype=b.params[0][1].dtype, device=b.grad.device)
        for _, p, start, end in b.ranges():
            b.data[start:end].copy_(p.detach().reshape(-1))
            p.data = b.data[start:end].view_as(p)
        b.master = nn.Parameter(b.data[b.shard].float().clone())

    @torch.no_grad()
    def finish_gradients(self, max_norm: float) -> torch.Tensor:
        """Wait for the DP reduction into each rank's shard, clip by the global norm (on the device),
        return the norm."""
        self.wait_for_params()  # a bucket no forward used: its weights are written again after this step
        for b, reduced in zip(self.buckets, self.gradients.reduce()):
            b.master.grad = reduced  # a view into the gradient buffer: no copy
        norm = self.gradients.norm()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([b.master for b in self.buckets], max_norm, norm)
        return norm

    @torch.no_grad()
    def step(self, closure=None, skip: Optional[torch.Tensor] = None):
        """Update the shards, then all-gather every bucket's weights, one asynchronous collective per
        bucket, the first layers' first. With overlap_param_sync each is waited for before the first
        forward that uses its weights (wait_for_params() before reading them otherwise); else here."""
        super().step(closure, skip)
        for i in reversed(range(len(self.buckets))):  # the last buckets hold the first layers
            b = self.buckets[i]
            b.data[b.shard].copy_(b.master)
            if self.num_shards > 1:
                # in place, as the reduce-scatter: this rank's shard is already where the result puts it
                self.gathering[i] = all_gather_into_tensor(b.data, b.data[b.shard], group=self.dp_group, async_op=True)
        if self.overlap_param_sync:
            self._wait_for_gathers(self._waited_in_step)
        else:
            self.wait_for_params()

    def zero_grad(self, set_to_none: bool = True):
        """Zero the gradient buffers in place: the parameters' gradients must stay views into them."""
        self.gradients.zero()
        for b in self.buckets:
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

"""Plain AdamW and what both optimizers share: weight-decay groups, the gradient buckets, the
non-finite skip on the device, and Adam's state layout."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from megaclip.model.parallel import is_tensor_parallel
from megaclip.optim.buckets import GradientBuckets


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: biases, norms, the temperature and every tensor of rank < 2 are not decayed.
    The class tokens are named: open_clip's one class embedding is [width] (rank 1), megaclip's are
    [class_token_length, width]."""
    return (param.ndim < 2 or "bias" in name or "ln_" in name or "logit_scale" in name
            or name.endswith("class_embedding"))


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def bucket_kind(name: str, param: torch.Tensor) -> tuple:
    """What the parameters of one gradient bucket share: the optimizer treats a bucket as one tensor."""
    return param.dtype, not no_weight_decay(name, param), is_tensor_parallel(param)


def gradient_buckets(model: nn.Module, optim_cfg, dp_group, tp_group, shard: bool) -> GradientBuckets:
    return GradientBuckets([(n, p) for n, p in model.named_parameters() if p.requires_grad], bucket_kind,
                           dp_group=dp_group, tp_group=tp_group, shard=shard,
                           bucket_size_mb=optim_cfg.bucket_size_mb, overlap=optim_cfg.overlap_grad_sync)


class BucketedAdamW:
    """What both optimizers add to torch's fused AdamW: their gradients live in ``self.gradients``
    (GradientBuckets), so ``no_sync()``; and ``step(skip=flag)``: the kernel takes a device flag as
    ``found_inf`` (as AMP's GradScaler passes it) and, when it is 1, leaves weights, moments and step
    count as they were; decided on the device, so skipping a non-finite step needs no host sync."""

    def step(self, closure=None, skip: Optional[torch.Tensor] = None):
        self.found_inf = skip
        try:
            return super().step(closure)
        finally:
            self.found_inf = None

    def no_sync(self):
        """A context for the backward passes of every micro step but the last: their gradients only
        accumulate, nothing is reduced over DP."""
        return self.gradients.no_sync()

    def gradients_final(self, params) -> None:
        """These parameters' gradients are complete before the last backward of the step (a GradCache
        loss pass): their DP reduction may start now."""
        self.gradients.mark_final(params)

    def wait_for_params(self) -> None:
        """Weights still being gathered after step() are complete after this (the distributed
        optimizer's overlap_param_sync); here they always are."""


class AdamW(BucketedAdamW, torch.optim.AdamW):
    """torch's AdamW (fused kernel) on the model's own fp32 parameters, whose gradients live in flat
    buckets averaged over DP while backward runs, with TP-aware clipping: the plain ``fused_adam`` path."""

    def __init__(self, model: nn.Module, optim_cfg, dp_group, tp_group):
        self.dp_group, self.tp_group = dp_group, tp_group
        super().__init__(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                         betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=True)
        self.gradients = gradient_buckets(model, optim_cfg, dp_group, tp_group, shard=False)

    state_is_sharded = False  # every DP rank holds the same state

    def finish_gradients(self, max_norm: float) -> torch.Tensor:
        """Wait for the DP average, clip by the global norm (on the device), return the norm."""
        self.gradients.reduce()
        norm = self.gradients.norm()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for group in self.param_groups for p in group["params"]],
                                                 max_norm, norm)
        return norm

    def zero_grad(self, set_to_none: bool = True):
        """Zero the gradient buffers in place: the parameters' .grad must stay views into them."""
        self.gradients.zero()

    def state_slices(self, model: nn.Module) -> dict:
        """The state by parameter name, each entry the element range it covers (here: all of it)."""
        out = {}
        for name, p in model.named_parameters():
            st = self.state.get(p)
            if st:
                out[name] = {"range": (0, p.numel()), "shape": tuple(p.shape), **{k: st[k].reshape(-1).clone() for k in MOMENTS}}
        return out

    @torch.no_grad()
    def load_state_slices(self, model: nn.Module, lookup, step: int) -> None:
        """Set every parameter's moments from ``lookup(name) -> {key: flattened TP-local tensor}``."""
        for name, p in model.named_parameters():
            st = self.state[p] = new_adam_state(p, step)
            for k in MOMENTS:
                st[k].copy_(lookup(name)[k].view_as(p))


MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_step_count(optimizer: torch.optim.Optimizer) -> int:
    return next((int(st["step"]) for st in optimizer.state.values() if "step" in st), 0)


def new_adam_state(like: torch.Tensor, step: int) -> dict:
    # fused AdamW keeps its step as a float32 tensor on the parameter's device
    return {"step": torch.tensor(float(step), dtype=torch.float32, device=like.device),
            "exp_avg": torch.zeros_like(like, dtype=torch.float32), "exp_avg_sq": torch.zeros_like(like, dtype=torch.float32)}

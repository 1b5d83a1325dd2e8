"""Plain AdamW and the gradient plumbing around it: weight-decay groups, averaging gradients over the
data-parallel group, and clipping their norm over tensor-parallel ranks."""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.distributed as dist
from torch import nn

from megaclip.distributed import all_reduce_coalesced
from megaclip.model.parallel import allreduce_sequence_parallel_grads, is_tensor_parallel


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


class AdamW(torch.optim.AdamW):
    """torch's AdamW (fused kernel) on the model's own fp32 parameters, with the DP gradient average
    and TP-aware clipping in front: the plain ``fused_adam`` path."""

    def __init__(self, model: nn.Module, optim_cfg, dp_group, tp_group):
        self.dp_group, self.tp_group = dp_group, tp_group
        super().__init__(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                         betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=True)

    state_is_sharded = False  # every DP rank holds the same state

    def finish_gradients(self, max_norm: float) -> torch.Tensor:
        params = [p for group in self.param_groups for p in group["params"]]
        allreduce_sequence_parallel_grads(params, self.tp_group)
        average_gradients(params, self.dp_group)
        return clip_grad_norm(params, max_norm, self.tp_group)

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


def average_gradients(params: Iterable[torch.Tensor], group) -> None:
    """Average gradients over the DP group with one all-reduce."""
    if group is not None and dist.get_world_size(group) > 1:
        all_reduce_coalesced([p.grad for p in params if p.grad is not None], group, divide_by=dist.get_world_size(group))


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, tp_group) -> torch.Tensor:
    """Clip to ``max_norm`` by the norm of the full model's gradient: TP shards summed over the TP
    group, TP-replicated tensors (identical on every TP rank) counted once."""
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device
    sharded = _squared_sum([p.grad for p in params if is_tensor_parallel(p)], device)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    total = (sharded + _squared_sum([p.grad for p in params if not is_tensor_parallel(p)], device)).sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _squared_sum(tensors: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([t.float().pow(2).sum() for t in tensors]).sum()


MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_step_count(optimizer: torch.optim.Optimizer) -> int:
    return next((int(st["step"]) for st in optimizer.state.values() if "step" in st), 0)


def new_adam_state(like: torch.Tensor, step: int) -> dict:
    # fused AdamW keeps its step as a float32 tensor on the parameter's device
    return {"step": torch.tensor(float(step), dtype=torch.float32, device=like.device),
            "exp_avg": torch.zeros_like(like, dtype=torch.float32), "exp_avg_sq": torch.zeros_like(like, dtype=torch.float32)}

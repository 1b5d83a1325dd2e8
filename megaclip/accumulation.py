"""One optimizer step's forward and backward over this rank's batch, in micro-batches, leaving exactly
the gradient of the whole batch's loss in ``.grad`` (not yet reduced over DP: the optimizer's
``finish_gradients`` does that once per optimizer step).

A per-sample objective (CatLIP: a mean of per-sample terms) accumulates plainly: each micro-batch's
loss divided by the number of micro-batches. A contrastive loss couples every sample with the whole
global batch, so its micro-batches are run the GradCache way (Gao et al. 2021):

1. forward every micro-batch without autograd, keeping only its features;
2. the loss over the rank's whole batch (the objective gathers over DP as it always does) from those
   features, and its backward: the gradient of every feature, and of the logit scale / bias, once;
3. forward each micro-batch again with autograd and backpropagate its cached feature gradients.

Pass 3 must compute what pass 1 did. Patch dropout and drop path draw from generators seeded for the
optimizer step (megaclip.model.regularisers.drawn_for_step), so both passes, and any split of the
batch, draw what the whole batch would; the loss's own layers (fusion) draw from a stream of their
own, so that running the loss apart from the towers changes nothing. Tower dropout (attention and
hidden dropout) draws from torch's generator masks the shape of the micro-batch, which no split can
make equal to the whole batch's; the generator's state before each micro-batch of pass 1 is replayed
before that micro-batch in pass 3, so the gradient is exactly that of the loss that pass 2 computed,
with the masks pass 1 drew.

open_clip's ``--accum-freq`` differs in both respects: its pass 3 recomputes the loss once per
micro-batch, so the logit scale's gradient comes out k times too large, and it replays no random state.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, List, Tuple

import torch
from torch import Tensor

from megaclip.model.regularisers import draw_step_seed, drawn_for_step

LOSS_STREAM = 2 ** 62  # seeds from draw_step_seed are below it: the two streams never share a seed


def step(objective, model, images: Tensor, batch: Tensor, micro_batches: int, device: torch.device,
         optimizer=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Forward and backward of this rank's batch (``images`` and ``batch``, samples on dim 0, moved to
    ``device`` a micro-batch at a time) in ``micro_batches`` equal parts; returns the loss and its named
    terms, detached. Every backward but the last runs inside ``optimizer.no_sync()`` (gradients only
    accumulate there; the last backward may start their DP reduction); the GradCache way, the loss's own
    parameters are handed to ``optimizer.gradients_final`` once the loss pass has given them their whole
    gradient, so that their reduction starts then. Called inside the loop's autocast, which both passes
    then share."""
    seed = draw_step_seed()  # the towers' draws; the loss's: seed + LOSS_STREAM
    parts = list(zip(images.chunk(micro_batches), batch.chunk(micro_batches)))
    optimizer = optimizer or _NoOptimizer()
    if micro_batches == 1 or objective.per_sample:
        return _plain(objective, model, parts, seed, device, optimizer)
    return _grad_cache(objective, model, parts, seed, device, optimizer)


class _NoOptimizer:
    """What step() needs of an optimizer, for callers without one: no reduction to hold back or start."""

    no_sync = staticmethod(contextlib.nullcontext)

    def gradients_final(self, params) -> None:
        pass


def _on(device: torch.device, *tensors: Tensor) -> List[Tensor]:
    return [t.to(device, non_blocking=True) for t in tensors]


def _last_syncs(optimizer, i: int, k: int) -> ContextManager:
    return contextlib.nullcontext() if i == k - 1 else optimizer.no_sync()


def _plain(objective, model, parts, seed: int, device, optimizer) -> Tuple[Tensor, Dict[str, Tensor]]:
    k, total, terms = len(parts), 0.0, {}
    for i, part in enumerate(parts):
        with drawn_for_step(seed, i, k):
            features = objective.features(model, *_on(device, *part))
        with drawn_for_step(seed + LOSS_STREAM, i, k):
            loss, named = objective.loss(model, features)
        with _last_syncs(optimizer, i, k):
            (loss / k).backward()
        total = total + loss.detach() / k
        terms = {name: terms.get(name, 0.0) + term.detach() / k for name, term in named.items()}
    return total, terms


def _grad_cache(objective, model, parts, seed: int, device, optimizer) -> Tuple[Tensor, Dict[str, Tensor]]:
    k, cached, rng_states = len(parts), [], []
    with torch.no_grad():
        for i, part in enumerate(parts):
            rng_states.append(_rng_state(device))
            with drawn_for_step(seed, i, k):
                cached.append(objective.features(model, *_on(device, *part)))
    after = _rng_state(device)
    features = tuple(torch.cat(column).requires_grad_(column[0].is_floating_point()) for column in zip(*cached))
    del cached
    with drawn_for_step(seed + LOSS_STREAM):  # the rank's whole batch, as one micro-batch
        loss, terms = objective.loss(model, features)
    with optimizer.no_sync():
        loss.backward()
    # complete now (pass 3 does not reach them): their DP reduction may run while pass 3 computes
    optimizer.gradients_final(objective.loss_only_parameters(model))
    for i, part in enumerate(parts):
        _set_rng_state(rng_states[i], device)
        with drawn_for_step(seed, i, k):
            recomputed = objective.features(model, *_on(device, *part))
        pairs = [(f, whole.grad.chunk(k)[i]) for f, whole in zip(recomputed, features)
                 if f.requires_grad and whole.grad is not None]  # not ids, nor features the loss left unused
        with _last_syncs(optimizer, i, k):
            torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
    _set_rng_state(after, device)
    return loss.detach(), {name: term.detach() for name, term in terms.items()}


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    cpu, accelerator = state
    torch.set_rng_state(cpu)
    if accelerator is not None:
        torch.cuda.set_rng_state(accelerator, device)

"""Train-time regularisers of the towers: patch dropout (FLIP) and stochastic depth (drop path).

Their randomness is drawn for the whole data-parallel batch, of which each rank keeps its own rows. In
training (``drawn_for_step``, which megaclip.accumulation sets around every micro-batch's forward) the
draws come from generators seeded for the optimizer step, apart from the stream that tower dropout
consumes; elsewhere from torch's global generator, which every rank seeds alike and consumes alike.
So a sample's mask depends only on the seed, the step and the sample's place in the global batch: the
ranks of a TP group (same samples) agree without communicating, every TP/DP layout drops the same
patches and residual branches as one process does, and so does every split of the batch into
micro-batches (whatever tower dropout drew in between: its draws depend on the micro-batch's shape).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from torch import nn


def kept_patch_count(num_patches: int, rate: float, class_tokens: int = 0, multiple: int = 1) -> int:
    """Patches kept per image: open_clip's ``max(1, int(N * (1 - p)))`` (the same float arithmetic, so
    a run keeps as many as open_clip's would), rounded down so that class tokens + kept patches divide by
    ``multiple`` (the TP size under sequence parallelism). Rounding down rather than padding: padding
    would need an attention mask in every layer, which takes SDPA off its fused kernels, against the
    point of dropping patches; it costs fewer than ``multiple`` patches."""
    keep = max(1, int(num_patches * (1 - rate)))
    fitted = keep - (class_tokens + keep) % multiple
    if fitted < 1:
        raise ValueError(f"keeps {keep} of {num_patches} patches; {class_tokens} class token(s) + kept patches "
                         f"must divide by tp {multiple} under sequence parallelism, and no count from 1 to {keep} "
                         "does (lower the rate)")
    return fitted


_step = None  # (seed, micro-batch index, micro-batch count, draw counter) while drawn_for_step is active


def draw_step_seed() -> int:
    """An optimizer step's seed for ``drawn_for_step``, from torch's generator (seeded alike on every rank
    and checkpointed, so a resumed run draws the same)."""
    return int(torch.randint(2 ** 62, ()))


@contextlib.contextmanager
def drawn_for_step(seed: int, micro_batch: int = 0, micro_batches: int = 1):
    """Within: the forward of micro-batch ``micro_batch`` of ``micro_batches`` equal parts of this rank's
    batch. Its i-th draw comes from a generator seeded ``seed + i`` and covers the global batch of the
    optimizer step, so every micro-batch, and the recompute of one, draws the same numbers as the whole
    batch would, and keeps its own rows of them."""
    global _step
    previous, _step = _step, (seed, micro_batch, micro_batches, itertools.count())
    try:
        yield
    finally:
        _step = previous


def rows_of_global_batch(draw: Callable[[int, Optional[torch.Generator]], torch.Tensor], local_batch: int,
                         device: torch.device) -> torch.Tensor:
    """``draw(n, generator)`` for the n samples of the data-parallel global batch; this rank's
    ``local_batch`` rows (those of its micro-batch within ``drawn_for_step``)."""
    rank, size = 0, 1
    if parallel_state.model_parallel_is_initialized():  # models built without process groups are one process
        rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    if _step is None:
        return draw(size * local_batch, None)[rank * local_batch:(rank + 1) * local_batch]
    seed, micro_batch, micro_batches, draws = _step
    generator = torch.Generator(device).manual_seed(seed + next(draws))
    rank_batch = micro_batches * local_batch
    start = rank * rank_batch + micro_batch * local_batch
    return draw(size * rank_batch, generator)[start:start + local_batch]


class PatchDropout(nn.Module):
    """Keeps the class tokens and a random subset of each image's patch tokens (after the positional
    embedding, so the kept ones know where they came from); identity in eval mode."""

    def __init__(self, rate: float, class_tokens: int, multiple: int = 1):
        super().__init__()
        self.rate, self.class_tokens, self.multiple = rate, class_tokens, multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        classes, patches = x[:, :self.class_tokens], x[:, self.class_tokens:]
        b, n, width = patches.shape
        keep = kept_patch_count(n, self.rate, self.class_tokens, self.multiple)
        # open_clip's choice (top-k of Gaussian noise), so one process keeps the very patches it keeps
        noise = rows_of_global_batch(lambda rows, g: torch.randn(rows, n, generator=g, device=x.device), b, x.device)
        kept = noise.topk(keep, dim=1).indices
        return torch.cat([classes, patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))], dim=1)


class DropPath:
    """Stochastic depth with timm's schedule: the drop rate of layer i is ``linspace(0, rate, layers)[i]``;
    each layer's attention and MLP branches are dropped per sample independently, kept ones scaled by
    1 / (1 - rate) so the expected residual stays the same."""

    def __init__(self, rate: float, num_layers: int):
        self.rate, self.num_layers = rate, num_layers

    def layer_rates(self, device: Optional[torch.device] = None) -> torch.Tensor:
        return torch.linspace(0, self.rate, self.num_layers, device=device)  # made there: no copy to the device

    def scales(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        """[layers, 2 (attention, MLP), batch, 1, 1] factors (0 or 1 / (1 - rate)) for the residual
        branches, or None when nothing is dropped. Drawn once for the whole tower before the sequence is
        split over TP, so every sequence shard of a sample uses the same factor, and passed into the
        layers as input, so activation checkpointing's recompute reuses them (draws nothing)."""
        if self.rate == 0:
            return None
        noise = rows_of_global_batch(lambda rows, g: torch.rand(rows, self.num_layers, 2, generator=g, device=device),
                                     batch, device)
        rates = self.layer_rates(device)[:, None, None]
        keep = noise.permute(1, 2, 0) >= rates
        return (keep / (1 - rates))[..., None, None]

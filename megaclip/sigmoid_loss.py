"""SigLIP's sigmoid loss over the data-parallel group, the text features passed round the DP ring.

Rank r's loss is open_clip's per-rank SigLipLoss: its B images against all DP·B texts,

    L_r = -(1/B) Σ_{i local} Σ_{j global} log σ(z_ij (t x_i·y_j + b)),   z = +1 for a true pair, -1 otherwise,

so the DP average of the gradients is the gradient of (1/DP) Σ_r L_r: the formula over the whole
global batch. Only DP ranks hold different samples, so the ring is the DP group's (its ranks are not
consecutive global ranks at TP > 1), never the world's, as open_clip's and Inf-CL's are.

Image features stay local; text blocks travel round the ring in both directions, so DP - 1 foreign
blocks arrive in ⌈(DP - 1)/2⌉ exchanges. Autograd through the exchanges would keep every received
block and its B×B logits for backward (open_clip issue #942: memory grows with DP). RingSigmoidLoss
saves only the local blocks: its backward passes the text blocks round the ring again, each with the
gradient collected for it so far, recomputes each block's logits, and sends every collected gradient
to its owner in one message. Hand-written because torch has no ring primitive with that backward.

With ``block_size`` each B×B block of logits is itself taken in tiles of that many rows and columns,
in forward and in backward, so no more than one tile of logits exists at a time: the memory of the
loss then grows linearly with B (gradient accumulation makes B the rank's whole batch).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaclip.losses import tiles


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, group=None, block_size: int = 0) -> torch.Tensor:
    """Rank r's L_r over the DP ``group`` (None or one rank: the plain loss); logits in fp32 or better,
    also under autocast (which would run the logit matmuls in bf16); ``block_size`` 0: whole blocks."""
    image_features, text_features, logit_scale, logit_bias = (
        t.to(torch.promote_types(t.dtype, torch.float32))
        for t in (image_features, text_features, logit_scale, logit_bias))
    with torch.autocast(image_features.device.type, enabled=False):
        return RingSigmoidLoss.apply(image_features, text_features, logit_scale, logit_bias, group, block_size)


def _signs(rows: slice, cols: slice, positive: bool, like: torch.Tensor) -> torch.Tensor:
    """z of one tile: -1 everywhere, +1 where row and column are the same pair (in the block of true pairs)."""
    z = -torch.ones(rows.stop - rows.start, cols.stop - cols.start, dtype=like.dtype, device=like.device)
    if positive:
        z.diagonal(cols.start - rows.start).fill_(1.0)  # row i, column i: offset by where the tile starts
    return z


def _block_loss(x, y, scale, bias, positive: bool, tile: int) -> torch.Tensor:
    total = 0.0
    for rows, cols in tiles(x.shape[0], x.shape[0], tile):
        z = _signs(rows, cols, positive, x)
        total = total - F.logsigmoid(z * (scale * (x[rows] @ y[cols].T) + bias)).sum()
    return total / x.shape[0]


class _Ring:
    """The DP group as a ring: neighbours by group rank, messages addressed by global rank."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.size > 1 else 0
        # steps taken by the blocks moving right (arriving from the left) and by those moving left
        self.right_steps, self.left_steps = self.size // 2, (self.size - 1) // 2

    def peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.size)

    def exchange(self, sends: List[Tuple[torch.Tensor, int]]) -> List[torch.Tensor]:
        """Send each tensor to the rank ``offset`` away and receive one like it from ``-offset``."""
        received = [torch.empty_like(t) for t, _ in sends]
        ops = []
        for (tensor, offset), into in zip(sends, received):
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), self.peer(offset), self.group))
            ops.append(dist.P2POp(dist.irecv, into, self.peer(-offset), self.group))
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        return received

    def schedule(self):
        """Per exchange: the offsets (+1 right, -1 left) of the streams still moving."""
        return [[1] + ([-1] if k <= self.left_steps else []) for k in range(1, self.right_steps + 1)]


class RingSigmoidLoss(torch.autograd.Function):
    """L_r and its exact gradients, keeping only (x, y, t, b) for backward (see the module's text)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, group, tile):
        ring = _Ring(group)
        ctx.ring, ctx.tile = ring, tile
        ctx.save_for_backward(x, y, scale, bias)
        loss = _block_loss(x, y, scale, bias, positive=True, tile=tile)
        moving = {1: y, -1: y}
        for offsets in ring.schedule():
            for offset, block in zip(offsets, ring.exchange([(moving[o], o) for o in offsets])):
                moving[offset] = block
                loss = loss + _block_loss(x, block, scale, bias, positive=False, tile=tile)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, scale, bias = ctx.saved_tensors
        ring = ctx.ring
        grads = {"x": torch.zeros_like(x), "scale": torch.zeros_like(scale), "bias": torch.zeros_like(bias)}

        def block_grad(block, positive):
            """Adds this block's gradients of x, t and b; returns the gradient of the text block."""
            grad_block = torch.zeros_like(block)
            for rows, cols in tiles(x.shape[0], x.shape[0], ctx.tile):
                dots = x[rows] @ block[cols].T
                z = _signs(rows, cols, positive, x)
                # d/dl of -log σ(z l) is -z σ(-z l); the loss divides by the local batch
                d_logits = -z * torch.sigmoid(-z * (scale * dots + bias)) * (grad_loss / x.shape[0])
                grads["x"][rows] += scale * (d_logits @ block[cols])
                grads["scale"] += (d_logits * dots).sum()
                grads["bias"] += d_logits.sum()
                grad_block[cols] += scale * (d_logits.T @ x[rows])
            return grad_block

        grad_y = block_grad(y, positive=True)
        if ring.size > 1:
            # each stream carries [text block, gradient collected for it]; the owner's part stays home
            start = torch.stack([y, torch.zeros_like(y)])
            moving = {1: start, -1: start}
            for offsets in ring.schedule():
                for offset, message in zip(offsets, ring.exchange([(moving[o], o) for o in offsets])):
                    message[1] += block_grad(message[0], positive=False)
                    moving[offset] = message
            # a stream that went k steps right (+1) of its block's owner sends the gradient k steps back
            steps = {1: ring.right_steps, -1: ring.left_steps}
            for returned in ring.exchange([(moving[o][1], -o * steps[o]) for o in (1, -1) if steps[o]]):
                grad_y += returned
        return grads["x"], grad_y, grads["scale"], grads["bias"], None, None

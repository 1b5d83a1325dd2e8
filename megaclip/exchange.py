"""Rows of a batch split over the data-parallel group, fetched by their index in the global batch.

The fusion objective scores each image against a caption drawn from the whole global batch (and each
caption against an image), so a rank needs the token states of a few rows that other ranks hold. Every
rank knows every rank's draw (the same generator, the same similarities), so each can work out what to
send without being asked, and one all_to_all moves exactly the drawn rows: each rank sends and receives
about its local batch of rows, whatever the DP size. All-gathering the token states instead would
move, and hold, DP times the local batch.

Backward is the reverse all_to_all: a row's gradient returns to the rank that owns it, summed there
over every rank (and every draw) that used it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _plan(wanted: torch.Tensor, batch: int, rank: int):
    """``wanted``: [ranks, n] global row indices each rank wants. Returns the local rows this rank
    sends (grouped by destination), the counts sent to and received from each rank, and where each
    received row goes in this rank's result."""
    owner = wanted // batch
    send_rows = torch.cat([wanted[r][owner[r] == rank] - rank * batch for r in range(len(wanted))])
    send_counts = [int((owner[r] == rank).sum()) for r in range(len(wanted))]
    recv_counts = [int((owner[rank] == s).sum()) for s in range(len(wanted))]
    arrival = torch.sort(owner[rank], stable=True).indices  # rows arrive grouped by source rank, in order
    return send_rows, send_counts, recv_counts, arrival


class _FetchRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, wanted: torch.Tensor, group) -> torch.Tensor:
        rank = dist.get_rank(group)
        send_rows, send_counts, recv_counts, arrival = _plan(wanted.cpu(), local.shape[0], rank)
        send_rows, arrival = send_rows.to(local.device), arrival.to(local.device)
        received = local.new_empty((sum(recv_counts), *local.shape[1:]))
        dist.all_to_all_single(received, local[send_rows].contiguous(), recv_counts, send_counts, group=group)
        out = torch.empty_like(received)
        out[arrival] = received
        ctx.save_for_backward(send_rows, arrival)
        ctx.counts, ctx.group, ctx.local_shape = (send_counts, recv_counts), group, local.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_rows, arrival = ctx.saved_tensors
        send_counts, recv_counts = ctx.counts
        returned = grad.new_empty((sum(send_counts), *grad.shape[1:]))
        dist.all_to_all_single(returned, grad[arrival].contiguous(), send_counts, recv_counts, group=ctx.group)
        return grad.new_zeros(ctx.local_shape).index_add_(0, send_rows, returned), None, None


def fetch_rows(local: torch.Tensor, wanted: torch.Tensor, group) -> torch.Tensor:
    """The rows ``wanted[rank]`` of the global batch (this rank's ``local`` rows concatenated over the
    ranks of ``group`` in rank order), differentiably. ``wanted``: [ranks, n] global indices, the same
    on every rank; on the host already, the plan costs no device sync."""
    if group is None or dist.get_world_size(group) == 1:
        return local[wanted[0]]
    return _FetchRows.apply(local, wanted, group)

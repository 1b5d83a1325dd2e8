"""The one place that decides which class backs a linear layer.

Every tower builds its linears through a ``Linears`` factory: ``column`` splits output features across
the tensor-parallel (TP) ranks, ``row`` splits input features and all-reduces the output. Whatever
backs them (megatron-core's parallel linears, or a plain ``nn.Linear`` at TP=1, which we measured 7-9 %
faster; with nn.Embedding for tokens, such a model needs no process group at all; or, with
``transformer_impl="te"``, transformer-engine's Linear, see ``megaclip.model.te_linear``), parameters are
named ``weight``/``bias`` with the same shapes, so checkpoints do not care.

Sequence parallelism is done here too, with our own autograd functions rather than megatron-core's:
its sequence-parallel communication allocates on CUDA and fails on CPU. Activations between the TP
regions are split along the sequence (dim 1 of ``[batch, seq, hidden]``).

Weights are always initialised full-size on CPU from the global RNG and then split, so the same seed
gives the same global model at any TP size.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

# megaclip.distributed first: it imports megatron-core with a clear message when triton is missing
from megaclip.distributed import all_gather_into_tensor, reduce_scatter_tensor
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def normal_init(std: float) -> InitMethod:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


class ColumnLinear(ColumnParallelLinear):
    """Output features split across TP ranks; returns the local output with its bias added.
    Under sequence parallelism the input arrives split along the sequence and is all-gathered first."""

    def __init__(self, *args, sequence_parallel: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.megaclip_sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.megaclip_sequence_parallel:
            return F.linear(gather_sequence(x, grad_is_partial=True), self.weight, self.bias)
        return megatron_forward(super().forward, x)


class RowLinear(RowParallelLinear):
    """Input features split across TP ranks; returns the full (all-reduced) output plus bias.
    Under sequence parallelism the sum is reduce-scattered along the sequence instead."""

    def __init__(self, *args, sequence_parallel: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.megaclip_sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.megaclip_sequence_parallel:
            return reduce_scatter_sequence(F.linear(x, self.weight)) + self.bias
        return megatron_forward(super().forward, x)


def megatron_forward(forward, x: torch.Tensor) -> torch.Tensor:
    """A megatron-core linear built with skip_bias_add, its bias added here in the output's dtype:
    megatron-core would add the fp32 bias to the bf16 output of an autocast matmul, making that output,
    and every activation after it, fp32. It also declares its autocast behaviour for CUDA only, so
    under CPU autocast its backward would meet bf16 gradients and fp32 weights: on CPU it runs in fp32."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out, bias = forward(x.float())
    else:
        out, bias = forward(x)
    return out if bias is None else out + bias.to(out.dtype)


class TorchLinear(nn.Linear):
    """nn.Linear initialised like the parallel classes (full weight from init_method, zero bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_method: InitMethod):
        # Built on the meta device so nn.Linear's own initialisation draws nothing from the RNG:
        # the RNG stream, and so every later weight, stays the same as with the parallel classes.
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.to_empty(device="cpu")
        with torch.no_grad():
            init_method(self.weight)
            if self.bias is not None:
                self.bias.zero_()


class Linears:
    """Factory for the column / row linears of one tower. ``impl`` (model.linear_impl) backs them and the
    token embedding; ``transformer_impl="te"`` (model.transformer_impl) puts transformer-engine's Linear
    behind the column and row linears instead, with FP8 GEMMs when ``fp8`` names a format (model.fp8)."""

    def __init__(self, tensor_parallel_size: int, impl: str = "auto", sequence_parallel: bool = False,
                 transformer_impl: str = "local", fp8: str = "none"):
        if impl == "auto":
            impl = "torch" if tensor_parallel_size == 1 else "megatron"
        self.impl = impl
        self.tp = tensor_parallel_size
        self.sequence_parallel = sequence_parallel
        self.transformer_impl = transformer_impl
        self.fp8 = fp8
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=tensor_parallel_size,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=torch.float32,
            gradient_accumulation_fusion=False,
        )

    @classmethod
    def for_towers(cls, model_cfg) -> "Linears":
        """The factory of the towers' layers for a ``model`` config section (``get``: configs saved
        before the transformer_impl and fp8 keys existed)."""
        return cls(model_cfg.tensor_model_parallel_size, model_cfg.linear_impl, model_cfg.sequence_parallel,
                   model_cfg.get("transformer_impl", "local"), model_cfg.get("fp8", "none"))

    def column(self, in_features: int, out_features: int, init_method: InitMethod, bias: bool = True) -> nn.Module:
        if self.transformer_impl == "te":
            return self._te("column", in_features, out_features, init_method, bias)
        if self.impl == "torch":
            return TorchLinear(in_features, out_features, bias, init_method)
        return ColumnLinear(in_features, out_features, config=self.config, init_method=init_method, bias=bias,
                            gather_output=False, skip_bias_add=True, sequence_parallel=self.sequence_parallel,
                            disable_grad_reduce=self.sequence_parallel)

    def row(self, in_features: int, out_features: int, init_method: InitMethod, bias: bool = True) -> nn.Module:
        if self.transformer_impl == "te":
            return self._te("row", in_features, out_features, init_method, bias)
        if self.impl == "torch":
            return TorchLinear(in_features, out_features, bias, init_method)
        return RowLinear(in_features, out_features, config=self.config, init_method=init_method, bias=bias,
                         input_is_parallel=True, skip_bias_add=True, sequence_parallel=self.sequence_parallel)

    def _te(self, kind: str, in_features: int, out_features: int, init_method: InitMethod, bias: bool) -> nn.Module:
        from megaclip.model.te_linear import build_te_linear  # imports parallel: not at module level

        rank = parallel_state.get_tensor_model_parallel_rank() if self.tp > 1 else 0
        return build_te_linear(kind, in_features, out_features, bias, init_method, self.tp, rank,
                               self.sequence_parallel, self.fp8)

    def vocab_embedding(self, vocab_size: int, dim: int, std: float) -> nn.Module:
        """Token embedding split over the vocabulary, padded to a multiple of 128 x TP.

        Only the real rows draw from the RNG (padding rows are zero), so the values do not depend on
        the padding, and so not on TP."""

        def init(w: torch.Tensor) -> torch.Tensor:
            nn.init.normal_(w[:vocab_size], std=std)
            return nn.init.zeros_(w[vocab_size:])

        padded = padded_vocab_size(vocab_size, self.tp)
        if self.impl == "torch":
            embedding = nn.Embedding(padded, dim, device="meta").to_empty(device="cpu")
            with torch.no_grad():
                init(embedding.weight)
            return embedding
        return VocabParallelEmbedding(padded, dim, init_method=init, config=self.config)


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    multiple = 128 * tensor_parallel_size
    return math.ceil(vocab_size / multiple) * multiple


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """True for shards that differ across TP ranks (marked by megatron-core's parallel layers)."""
    return getattr(param, "tensor_model_parallel", False)


def gather_tensor_parallel(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The full-size tensor of a TP-sharded ``param`` (or of its gradient): shards concatenated along
    the partition dim. Replicated parameters come back as they are."""
    if not is_tensor_parallel(param) or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def _tp():
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()


def _all_gather_seq(x: torch.Tensor) -> torch.Tensor:
    group, tp = _tp()
    x = x.transpose(0, 1).contiguous()
    out = x.new_empty((x.shape[0] * tp, *x.shape[1:]))
    all_gather_into_tensor(out, x, group=group)
    return out.transpose(0, 1)


def _reduce_scatter_seq(x: torch.Tensor) -> torch.Tensor:
    group, tp = _tp()
    x = x.transpose(0, 1).contiguous()
    out = x.new_empty((x.shape[0] // tp, *x.shape[1:]))
    reduce_scatter_tensor(out, x, op=dist.ReduceOp.SUM, group=group)
    return out.transpose(0, 1)


def _split_seq(x: torch.Tensor) -> torch.Tensor:
    return x.chunk(_tp()[1], dim=1)[parallel_state.get_tensor_model_parallel_rank()].contiguous()


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grad_is_partial):
        ctx.grad_is_partial = grad_is_partial
        return _all_gather_seq(x)

    @staticmethod
    def backward(ctx, grad):
        return (_reduce_scatter_seq(grad) if ctx.grad_is_partial else _split_seq(grad)), None


class _ToSequenceShard(torch.autograd.Function):
    """Forward: this rank's part of the sequence, summed over TP (``reduce``) or taken as it is;
    backward: the gradient all-gathered."""

    @staticmethod
    def forward(ctx, x, reduce):
        return _reduce_scatter_seq(x) if reduce else _split_seq(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad), None


def gather_sequence(x: torch.Tensor, grad_is_partial: bool) -> torch.Tensor:
    """All-gather the sequence. ``grad_is_partial``: each TP rank's gradient is a partial sum (the
    input of a column linear), so backward reduce-scatters; otherwise it is whole and is split."""
    return _GatherSequence.apply(x, grad_is_partial)


def reduce_scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    return _ToSequenceShard.apply(x, True)


def scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    return _ToSequenceShard.apply(x, False)


def mark_sequence_parallel(*modules_or_params) -> None:
    """Replicated parameters applied to a sequence shard see only part of the batch: their gradients
    must be summed over TP (the gradient buckets do, ``megaclip.optim.buckets``)."""
    for item in modules_or_params:
        for p in (item.parameters() if isinstance(item, nn.Module) else [item]):
            p.sequence_parallel = True

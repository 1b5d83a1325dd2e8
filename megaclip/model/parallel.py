"""The one place that decides which class backs a linear layer.

Every tower builds its linears through a ``Linears`` factory: ``column`` splits output features across
the tensor-parallel (TP) ranks, ``row`` splits input features and all-reduces the output. Whatever
backs them (megatron-core's parallel linears, or a plain ``nn.Linear`` at TP=1, which we measured 7-9 %
faster; with nn.Embedding for tokens, such a model needs no process group at all), parameters are named ``weight``/``bias`` with the same shapes, so checkpoints do not care.

Weights are always initialised full-size on CPU from the global RNG and then split, so the same seed
gives the same global model at any TP size.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def normal_init(std: float) -> InitMethod:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


class ColumnLinear(ColumnParallelLinear):
    """Output features split across TP ranks; returns the local output with its bias added."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """Input features split across TP ranks; returns the full (all-reduced) output plus bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


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
    """Factory for the column / row linears of one tower."""

    def __init__(self, tensor_parallel_size: int, impl: str = "auto"):
        if impl == "auto":
            impl = "torch" if tensor_parallel_size == 1 else "megatron"
        self.impl = impl
        self.tp = tensor_parallel_size
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=tensor_parallel_size,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=torch.float32,
            gradient_accumulation_fusion=False,
        )

    def column(self, in_features: int, out_features: int, init_method: InitMethod, bias: bool = True) -> nn.Module:
        if self.impl == "torch":
            return TorchLinear(in_features, out_features, bias, init_method)
        return ColumnLinear(in_features, out_features, config=self.config, init_method=init_method,
                            bias=bias, gather_output=False, skip_bias_add=False)

    def row(self, in_features: int, out_features: int, init_method: InitMethod, bias: bool = True) -> nn.Module:
        if self.impl == "torch":
            return TorchLinear(in_features, out_features, bias, init_method)
        return RowLinear(in_features, out_features, config=self.config, init_method=init_method,
                         bias=bias, input_is_parallel=True, skip_bias_add=False)

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

"""transformer-engine's Linear behind the ``Linears`` factory (``model.transformer_impl=te``), with
optional FP8 GEMMs from one of its recipes (``model.fp8``).

transformer-engine (TE) builds only against CUDA, so it is optional: ``transformer_impl_problem`` says
in one line, before any process group starts, why a config cannot use it here. The layer it backs is
TE's ``Linear`` itself (a subclass), so parameters keep the names ``weight`` and ``bias`` and the
shapes of the local linears: checkpoints move between ``local`` and ``te`` unchanged, no key map.

TE only computes this rank's GEMM; the tensor-parallel communication stays megaclip's (megatron-core's
all-reduce mappings, or the sequence-parallel functions of ``megaclip.model.parallel``): TE's own
tensor- and sequence-parallel modes expect a sequence-first layout ([seq, batch, hidden]) and draw their
initialisation on each rank, where megaclip is batch-first and initialises full-size from one seed and
splits, so that every TP size builds the same global model.

TE's LayerNormLinear (the LayerNorm fused into the next GEMM) is not used: it would move ``ln_1`` and
``ln_2`` into the qkv and fc modules, renaming their parameters.
"""
from __future__ import annotations

import contextlib
import functools
import importlib

import torch
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)

from megaclip.model.attention import say_once
from megaclip.model.parallel import gather_sequence, reduce_scatter_sequence

TRANSFORMER_IMPLS = ("local", "te")
FP8_FORMATS = ("none", "hybrid", "e4m3")  # hybrid: E4M3 forward, E5M2 gradients (TE's advice for training)


def transformer_impl_problem(transformer_impl: str, fp8: str):
    """Why ``model.transformer_impl`` / ``model.fp8`` cannot run here (one line), or None."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        return f"model.transformer_impl must be local or te, got '{transformer_impl}'"
    if fp8 not in FP8_FORMATS:
        return f"model.fp8 must be none, hybrid or e4m3, got '{fp8}'"
    if fp8 != "none" and transformer_impl != "te":
        return f"model.fp8={fp8} needs model.transformer_impl=te (the FP8 GEMMs are transformer-engine's)"
    if transformer_impl == "te":
        reason = _te_unavailable()
        if reason:
            return (f"model.transformer_impl=te needs transformer-engine and a CUDA GPU; {reason} "
                    "(pip install 'transformer-engine[pytorch]' on a CUDA machine, or model.transformer_impl=local)")
    return None


def _te_unavailable():
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # ImportError, or a broken CUDA library underneath it
        return f"transformer_engine.pytorch does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not torch.cuda.is_available():
        return f"torch sees no GPU here (torch {torch.__version__})"
    return None


def fp8_context(fp8: str):
    """TE's FP8 autocast for format ``fp8`` (DelayedScaling recipe), or nothing."""
    if fp8 == "none":
        return contextlib.nullcontext()
    te = importlib.import_module("transformer_engine.pytorch")
    recipe = importlib.import_module("transformer_engine.common.recipe")
    fmt = recipe.Format.HYBRID if fp8 == "hybrid" else recipe.Format.E4M3
    # reduce_amax=False: the autocast is entered around each GEMM (see TELinear), and reducing the amax
    # history over the world at every exit would be a collective per GEMM; each rank scales by its own.
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe.DelayedScaling(fp8_format=fmt, reduce_amax=False))


def build_te_linear(kind: str, in_features: int, out_features: int, bias: bool, init_method, tp: int, tp_rank: int,
                    sequence_parallel: bool, fp8: str) -> torch.nn.Module:
    """A TE Linear holding this rank's shard of a ``kind`` ("column" or "row") parallel linear,
    initialised as megatron-core's CPU initialisation does: the full weight from ``init_method`` (the
    global RNG), split along dim 0 (column) or 1 (row); biases zero."""
    te = importlib.import_module("transformer_engine")
    say_once(f"model.transformer_impl=te: transformer-engine {getattr(te, '__version__', '(version unknown)')}'s Linear "
             f"behind the layers' linears, FP8 {'off' if fp8 == 'none' else fp8}")
    split = 0 if kind == "column" else 1
    local = [out_features // tp, in_features] if split == 0 else [out_features, in_features // tp]
    layer = _te_linear_class()(local[1], local[0], bias=bias, return_bias=kind == "row", params_dtype=torch.float32,
                               device="cpu", init_method=_leave_as_is)
    layer.configure(kind, tp, sequence_parallel, fp8)
    full = torch.empty(out_features, in_features)
    init_method(full)
    with torch.no_grad():
        layer.weight.copy_(full.chunk(tp, split)[tp_rank])
        if bias:
            layer.bias.zero_()
    # TE marks its weights tensor-parallel along dim 0 whatever the layout; megatron-core's marks instead
    # (which gathering and the gradient norm read), and none at TP=1, as on nn.Linear
    _mark_tensor_parallel(layer.weight, split if tp > 1 else None)
    if bias:
        _mark_tensor_parallel(layer.bias, 0 if tp > 1 and kind == "column" else None)
    return layer


def _leave_as_is(tensor: torch.Tensor) -> torch.Tensor:
    """TE's init_method: draws nothing (the weight is copied in right after), so the RNG stream, and
    every later parameter, stays the same as with the local linears."""
    return tensor


def _mark_tensor_parallel(param: torch.Tensor, dim) -> None:
    param.tensor_model_parallel = dim is not None
    if dim is not None:
        param.partition_dim, param.partition_stride = dim, 1


@functools.lru_cache(maxsize=None)
def _te_linear_class_for(te_linear: type) -> type:
    class TELinear(te_linear):
        """TE's Linear on this rank's shard, with megaclip's TP communication around it: a column
        linear copies its input into the TP region (its gradient all-reduced) or, under sequence
        parallelism, all-gathers the sequence; a row linear all-reduces (or reduce-scatters along the
        sequence) its output before adding the bias, which TE returns unadded."""

        def configure(self, kind: str, tp: int, sequence_parallel: bool, fp8: str) -> None:
            self.megaclip_kind, self.megaclip_tp = kind, tp
            self.megaclip_sequence_parallel, self.megaclip_fp8 = sequence_parallel, fp8

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.megaclip_kind == "column":
                if self.megaclip_sequence_parallel:
                    x = gather_sequence(x, grad_is_partial=True)
                elif self.megaclip_tp > 1:
                    x = copy_to_tensor_model_parallel_region(x)
                with fp8_context(self.megaclip_fp8):
                    return super().forward(x.contiguous())  # TE views its input as 2-D; the gather returns a transpose
            with fp8_context(self.megaclip_fp8):
                out, bias = super().forward(x.contiguous())
            if self.megaclip_sequence_parallel:
                out = reduce_scatter_sequence(out)
            elif self.megaclip_tp > 1:
                out = reduce_from_tensor_model_parallel_region(out)
            return out if bias is None or bias.numel() == 0 else out + bias.to(out.dtype)

    return TELinear


def _te_linear_class() -> type:
    # Looked up at build time (not import time): TE is optional, and tests put a stand-in in its place.
    return _te_linear_class_for(importlib.import_module("transformer_engine.pytorch").Linear)

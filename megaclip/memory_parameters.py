"""Bytes of the parameters, gradients and optimizer state on one GPU (notation: megaclip.memory).

Parameters, counted exactly by ``parameter_shapes`` (``CLIPModel``'s names and shapes on one TP rank).
qkv and fc (weight and bias), the weights of the two proj row linears and the token embedding (rows
padded to a multiple of 128·t) are split over t; everything else is replicated:
    layer    4h (ln_1, ln_2) + (3h² + 3h)/t + h²/t + h + (fh + f)/t + fh/t + h
    vision   conv1 3·p²·h + class k·h + positions (k + patches)·h + ln_pre, ln_post 4h + proj h·o
    text     tokens V_pad·h/t + positions ctx·h + ln_final 2h + projection h·o
    the objective's scalars: logit_scale 1 (clip), + logit_bias 1 (siglip)
    CatLIP   no text tower; its head, a column linear over its C classes: (o·C + C)/t
    fusion   per layer a text-width layer + cross-attention 2h + (h² + h)/t + (2h² + 2h)/t + h²/t + h;
             image_to_text h_v·h + h, ln_final 2h, itm_head 2h + 2 (model.fusion)
With n_local elements on a rank and weights of w bytes (2 under bf16 O2, where the objective's scalars
stay fp32; else 4):
    params      n_local·w
    grads       4·Σ n_i        the fp32 gradient buffers of the buckets i (megaclip.optim.buckets: one
                               kind of parameter each, at most model.optim.bucket_size_mb, taken backwards);
                               distributed_fused_adam pads each n_i to a multiple of d. bf16 gradients
                               are added into them as backward makes them, one tensor at a time
    optimizer   fused_adam: 8·n_local (torch AdamW's two moments, fp32); with O2 12·n_local (fp32
                master weights + two moments); distributed_fused_adam: 12·Σ ceil(n_i / d) over its
                buckets (kinds: dtype, weight decay, tensor-parallel; only megatron-core's layers,
                used at t > 1, mark parameters tensor-parallel)
    step        what finishing the gradients and stepping allocates, after the activations are freed:
                next to nothing: the DP reductions run in place in the fp32 buffers (a reduce-scatter
                and the all-gather after the update read and write this rank's shard of the same
                buffer, as NCCL allows) and the norm squares no copy.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Iterable, List, Tuple

import torch

from megaclip.data.synset_vocab import planned_class_count
from megaclip.model.parallel import padded_vocab_size
from megaclip.model.state import partition_dim
from megaclip.objectives import requirements
from megaclip.optim.adamw import no_weight_decay
from megaclip.optim.buckets import bucket_layout
from megaclip.precision import FP32_SCALARS

if TYPE_CHECKING:  # megaclip.memory imports this module
    from megaclip.memory import Layout


def parameter_shapes(model_cfg, tp: int) -> Dict[str, Tuple[int, ...]]:
    """``CLIPModel(model_cfg).named_parameters()``'s names and shapes on one rank at TP size ``tp``."""
    v, t = model_cfg.vision, model_cfg.text
    patches = (v.img_h // v.patch_dim) * (v.img_w // v.patch_dim)
    # a module's own parameters come before its submodules' in named_parameters
    shapes = {name: () for name in requirements(model_cfg).scalars}
    shapes.update({
        "visual.class_embedding": (v.class_token_length, v.hidden_size),
        "visual.positional_embedding": (v.class_token_length + patches, v.hidden_size),
        "visual.proj": (v.hidden_size, model_cfg.output_dim),
        "visual.conv1.weight": (v.hidden_size, v.num_channels, v.patch_dim, v.patch_dim),
        **_layer_norm("visual.ln_pre", v.hidden_size),
        **_transformer_shapes("visual.transformer", v, tp),
        **_layer_norm("visual.ln_post", v.hidden_size),
    })
    if "text" in requirements(model_cfg).towers:
        shapes.update({
            "text.positional_embedding": (t.encoder_seq_length, t.hidden_size),
            "text.text_projection": (t.hidden_size, model_cfg.output_dim),
            "text.token_embedding.weight": (padded_vocab_size(t.vocab_size, tp) // tp, t.hidden_size),
            **_transformer_shapes("text.transformer", t, tp),
            **_layer_norm("text.ln_final", t.hidden_size),
        })
    if model_cfg.loss == "catlip":
        classes = planned_class_count(model_cfg) // tp
        shapes.update({"catlip_head.weight": (classes, model_cfg.output_dim), "catlip_head.bias": (classes,)})
    if fusion_layer_count(model_cfg):
        shapes.update(_fusion_shapes(model_cfg, tp))
    return shapes


def fusion_layer_count(model_cfg) -> int:
    fusion = model_cfg.get("fusion")  # configs saved before the key existed have none
    return fusion.num_layers if fusion is not None else 0


def _fusion_shapes(model_cfg, tp: int) -> Dict[str, Tuple[int, ...]]:
    """The fusion layers (megaclip.model.fusion): a text-width layer plus cross-attention (q and kv
    column linears, a row proj, its LayerNorm), the image-token projection and the match head."""
    from megaclip.model.fusion import fusion_config

    f = fusion_config(model_cfg)
    w = f.hidden_size
    shapes = {"fusion.image_to_text.weight": (w, model_cfg.vision.hidden_size), "fusion.image_to_text.bias": (w,)}
    for name, shape in _transformer_shapes("fusion.transformer", f, tp).items():
        shapes[name] = shape
        if name.endswith("attn.proj.bias"):  # after self-attention: the cross-attention's
            p = name[:-len("attn.proj.bias")]
            shapes.update({**_layer_norm(f"{p}ln_cross", w),
                           f"{p}cross_attn.q.weight": (w // tp, w), f"{p}cross_attn.q.bias": (w // tp,),
                           f"{p}cross_attn.kv.weight": (2 * w // tp, w), f"{p}cross_attn.kv.bias": (2 * w // tp,),
                           f"{p}cross_attn.proj.weight": (w, w // tp), f"{p}cross_attn.proj.bias": (w,)})
    return {**shapes, **_layer_norm("fusion.ln_final", w), "fusion.itm_head.weight": (2, w), "fusion.itm_head.bias": (2,)}


def _layer_norm(prefix: str, width: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _transformer_shapes(prefix: str, tower, tp: int) -> Dict[str, Tuple[int, ...]]:
    w, f = tower.hidden_size, tower.ffn_hidden_size
    shapes = {}
    for i in range(tower.num_layers):
        p = f"{prefix}.layers.{i}"
        shapes.update({
            **_layer_norm(f"{p}.ln_1", w),
            f"{p}.attn.qkv.weight": (3 * w // tp, w), f"{p}.attn.qkv.bias": (3 * w // tp,),
            f"{p}.attn.proj.weight": (w, w // tp), f"{p}.attn.proj.bias": (w,),
            **_layer_norm(f"{p}.ln_2", w),
            f"{p}.mlp.fc.weight": (f // tp, w), f"{p}.mlp.fc.bias": (f // tp,),
            f"{p}.mlp.proj.weight": (w, f // tp), f"{p}.mlp.proj.bias": (w,),
        })
    return shapes


def weight_bytes(name: str, layout: Layout) -> int:
    """Bytes per element of parameter ``name``: O2 casts the model to bf16 but the objective's scalars."""
    return 2 if layout.bf16_weights and name not in FP32_SCALARS else 4


def parameter_buckets(model_cfg, layout: Layout) -> List[int]:
    """Elements per gradient bucket, as megaclip.optim.buckets lays them out: one kind (bytes per
    element, weight decay, tensor-parallel) per bucket, at most model.optim.bucket_size_mb of fp32
    gradient, the parameters taken backwards. Only megatron-core's layers mark parameters tensor-
    parallel; TP=1's plain nn.Linear and nn.Embedding do not."""
    marked = uses_megatron_layers(model_cfg, layout.tp)
    kinds_and_sizes = []
    for name, shape in parameter_shapes(model_cfg, layout.tp).items():
        decay = not no_weight_decay(name, torch.empty(shape, device="meta"))
        kinds_and_sizes.append(((weight_bytes(name, layout), decay, marked and partition_dim(name) is not None),
                                math.prod(shape)))
    cap = max(1, int(model_cfg.optim.bucket_size_mb * 2 ** 20 / 4))
    return [sum(kinds_and_sizes[i][1] for i in bucket) for bucket in bucket_layout(kinds_and_sizes, cap)]


def uses_megatron_layers(model_cfg, tp: int) -> bool:
    return model_cfg.linear_impl == "megatron" or (model_cfg.linear_impl == "auto" and tp > 1)


def optimizer_state_bytes(layout: Layout, bucket_elements: Iterable[int]) -> int:
    """Adam's state for parameters in flat buckets of ``bucket_elements`` (one entry per bucket; only
    distributed_fused_adam, which shards each bucket over DP, cares how they are split)."""
    elements = list(bucket_elements)
    if layout.optimizer == "distributed_fused_adam":
        return 12 * sum(math.ceil(n / layout.dp) for n in elements)
    return (12 if layout.bf16_weights else 8) * sum(elements)


def gradient_bytes(layout: Layout, bucket_elements: Iterable[int]) -> int:
    """The fp32 gradient buffers, each bucket padded to a multiple of the DP size when sharded."""
    shards = layout.dp if layout.optimizer == "distributed_fused_adam" else 1
    return 4 * sum(math.ceil(n / shards) * shards for n in bucket_elements)


def optimizer_step_bytes(bucket_elements: Iterable[int]) -> int:
    """What reducing the gradients and stepping allocates on top of the state, once the activations
    are freed: the collectives run in place in the buffers, the norm squares no copy, so only one fp32
    norm per bucket and a few scalars."""
    return 4 * len(list(bucket_elements)) + 64


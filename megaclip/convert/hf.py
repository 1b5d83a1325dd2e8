"""Hugging Face transformers' ``CLIPModel`` <-> megaclip.

Tensors map one to one except attention, whose separate q/k/v projections make megaclip's one per-head
qkv linear (megaclip.convert.qkv), and the projections, which HF holds as Linear weights [out, w]
where megaclip holds [w, out] matrices. HF pools text at the first ``eos_token_id`` (or, for legacy
configs with eos_token_id 2, at the largest id), megaclip at the first end-of-text id: the same position
for rows of CLIP BPE, whose end-of-text is its largest id. A ``model.loss=catlip`` model, which has no
text tower, exports as HF's ``CLIPVisionModelWithProjection`` (the image tower and its projection).
"""
from __future__ import annotations

from typing import Dict, List, Tuple, Union

import torch
from omegaconf import DictConfig

from megaclip.convert import (CLIP_BPE_TOKENIZER, check_names, dual_encoder, image_only, image_tower, import_library,
                              require_clip_bpe, tower_overrides)
from megaclip.convert.qkv import per_head_from_separate, separate_from_per_head
from megaclip.data.clip_bpe import EOT_ID, PAD_ID, SOT_ID
from megaclip.model.state import State

transformers = import_library("transformers")

_LEGACY_ARGMAX_EOS_ID = 2  # HF pools at the argmax token id for this eos_token_id, as open_clip does
_ACTIVATIONS = ("gelu", "quick_gelu")  # HF's "gelu" is the exact (erf) GELU, like torch's nn.GELU
# Buffers that transformers before 4.31 saved with the weights.
_POSITION_IDS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# (megaclip, HF) names of the tensors in one layer, q/k/v aside.
_LAYER = [("ln_1.weight", "layer_norm1.weight"), ("ln_1.bias", "layer_norm1.bias"),
          ("attn.proj.weight", "self_attn.out_proj.weight"), ("attn.proj.bias", "self_attn.out_proj.bias"),
          ("ln_2.weight", "layer_norm2.weight"), ("ln_2.bias", "layer_norm2.bias"),
          ("mlp.fc.weight", "mlp.fc1.weight"), ("mlp.fc.bias", "mlp.fc1.bias"),
          ("mlp.proj.weight", "mlp.fc2.weight"), ("mlp.proj.bias", "mlp.fc2.bias")]
_OUTSIDE_LAYERS = [("logit_scale", "logit_scale"),
                   ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
                   ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
                   ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
                   ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
                   ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
                   ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
                   ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
                   ("visual.proj", "visual_projection.weight"),
                   ("text.token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
                   ("text.positional_embedding", "text_model.embeddings.position_embedding.weight"),
                   ("text.ln_final.weight", "text_model.final_layer_norm.weight"),
                   ("text.ln_final.bias", "text_model.final_layer_norm.bias"),
                   ("text.text_projection", "text_projection.weight")]
_TRANSPOSED = ("visual.proj", "text.text_projection")
_TOWERS = (("visual", "vision_model"), ("text", "text_model"))


def from_hf(hf_state_dict: Dict[str, torch.Tensor], hf_config: Union["transformers.CLIPConfig", Dict]) -> Tuple[Dict, State]:
    """HF CLIPModel state dict and CLIPConfig (or its dict) -> (``model`` config overrides, megaclip full state)."""
    config = hf_config if isinstance(hf_config, transformers.CLIPConfig) else transformers.CLIPConfig(**hf_config)
    v, t = config.vision_config, config.text_config
    _check_supported(v, t)
    overrides = {
        "output_dim": config.projection_dim,
        "vision": {**_tower(v), "patch_dim": v.patch_size, "img_h": v.image_size, "img_w": v.image_size,
                   "num_channels": v.num_channels, "class_token_length": 1, "encoder_seq_length": None,
                   "global_average_pool": False},
        "text": {**_tower(t), "encoder_seq_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                 "tokenizer": dict(CLIP_BPE_TOKENIZER)},
    }
    source = {name: tensor for name, tensor in hf_state_dict.items() if name not in _POSITION_IDS}
    names, qkv = _names(v.num_hidden_layers, t.num_hidden_layers)
    check_names(source, [theirs for _, theirs in names] + [n for _, qkv_names in qkv for n in qkv_names], "HF")
    full = {}
    for ours, theirs in names:
        tensor = source[theirs]
        if ours in _TRANSPOSED:
            tensor = tensor.t().contiguous()
        elif ours == "visual.class_embedding":
            tensor = tensor.unsqueeze(0)
        full[ours] = tensor
    heads = {"visual": v.num_attention_heads, "text": t.num_attention_heads}
    for ours, qkv_names in qkv:
        full[ours] = per_head_from_separate(*(source[n] for n in qkv_names), heads[ours.split(".")[0]])
    return overrides, full


def to_hf(full: State, model_cfg: DictConfig) -> Tuple[Dict[str, torch.Tensor], "transformers.CLIPConfig"]:
    """megaclip full state and ``model`` config section -> (HF CLIPModel state dict, its CLIPConfig), or
    for a model without a text tower (CLIPVisionModelWithProjection's state dict, its CLIPVisionConfig)."""
    config = hf_clip_config(model_cfg)
    heads = {"visual": model_cfg.vision.num_attention_heads, "text": model_cfg.text.num_attention_heads}
    # an image tower alone: no text layers' q/k/v, and only the visual names of the rest
    names, qkv = _names(model_cfg.vision.num_layers, 0 if image_only(model_cfg) else model_cfg.text.num_layers)
    if image_only(model_cfg):
        names = [(ours, theirs) for ours, theirs in names if ours.startswith("visual.")]
    full = image_tower(full, "HF", "CLIPVisionModelWithProjection") if image_only(model_cfg) else dual_encoder(full, "HF")
    check_names(full, [ours for ours, _ in names] + [ours for ours, _ in qkv], "megaclip")
    out = {}
    for ours, theirs in names:
        tensor = full[ours]
        if ours in _TRANSPOSED:
            tensor = tensor.t().contiguous()
        elif ours == "visual.class_embedding":
            tensor = tensor.squeeze(0)
        out[theirs] = tensor
    for ours, qkv_names in qkv:
        out.update(zip(qkv_names, separate_from_per_head(full[ours], heads[ours.split(".")[0]])))
    return out, config


def hf_model(config: Union["transformers.CLIPConfig", "transformers.CLIPVisionConfig"]):
    """The HF model of a config hf_clip_config made, randomly initialised."""
    if isinstance(config, transformers.CLIPVisionConfig):
        return transformers.CLIPVisionModelWithProjection(config)
    return transformers.CLIPModel(config)


def hf_clip_config(model_cfg: DictConfig) -> Union["transformers.CLIPConfig", "transformers.CLIPVisionConfig"]:
    """HF's CLIPConfig for a megaclip ``model`` config section; CLIPVisionConfig for an image tower alone."""
    v, t = model_cfg.vision, model_cfg.text
    if not image_only(model_cfg):
        require_clip_bpe(model_cfg, "HF CLIP")
    if v.class_token_length != 1:
        raise ValueError(f"HF CLIP has one class token; model.vision.class_token_length is {v.class_token_length}")
    if v.global_average_pool:
        raise ValueError("HF CLIP pools the class token; model.vision.global_average_pool=True is not supported")
    vision = {**_hf_tower(v, model_cfg.output_dim), "image_size": v.img_h, "patch_size": v.patch_dim,
              "num_channels": v.num_channels}
    if image_only(model_cfg):
        return transformers.CLIPVisionConfig(**vision)
    if model_cfg.get("loss", "clip") != "clip":  # configs written before model.loss are CLIP's
        raise ValueError(f"HF CLIPModel has no logit_bias: a model.loss={model_cfg.loss} model converts to open_clip only")
    text = {**_hf_tower(t, model_cfg.output_dim), "vocab_size": t.vocab_size,
            "max_position_embeddings": t.encoder_seq_length, "pad_token_id": PAD_ID,
            "bos_token_id": SOT_ID, "eos_token_id": EOT_ID}
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=model_cfg.output_dim)


def _names(vision_layers: int, text_layers: int) -> Tuple[List[Tuple[str, str]], List[Tuple[str, Tuple[str, str, str]]]]:
    """(megaclip, HF) names of every tensor but q/k/v, and (megaclip qkv, HF (q, k, v)) names."""
    names, qkv = list(_OUTSIDE_LAYERS), []
    for (ours, theirs), layers in zip(_TOWERS, (vision_layers, text_layers)):
        for i in range(layers):
            a, b = f"{ours}.transformer.layers.{i}", f"{theirs}.encoder.layers.{i}"
            names += [(f"{a}.{x}", f"{b}.{y}") for x, y in _LAYER]
            qkv += [(f"{a}.attn.qkv.{p}", tuple(f"{b}.self_attn.{n}_proj.{p}" for n in "qkv")) for p in ("weight", "bias")]
    return names, qkv


def _check_supported(v, t) -> None:
    for name, tower in (("vision_config", v), ("text_config", t)):
        if tower.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"HF {name}.hidden_act={tower.hidden_act!r} is not supported (gelu or quick_gelu)")
    for key in ("image_size", "patch_size"):
        if not isinstance(getattr(v, key), int):
            raise ValueError(f"HF vision_config.{key}={getattr(v, key)!r}: only square images and patches "
                             "(one int) are supported")
    if t.eos_token_id not in (_LEGACY_ARGMAX_EOS_ID, EOT_ID):
        raise ValueError(f"HF text_config.eos_token_id={t.eos_token_id!r}: megaclip pools text at CLIP BPE's "
                         f"end-of-text ({EOT_ID}), so only that (or the legacy 2) is supported")


def _tower(hf_tower) -> Dict:
    return tower_overrides(hf_tower.num_hidden_layers, hf_tower.hidden_size, hf_tower.intermediate_size,
                           hf_tower.num_attention_heads, hf_tower.layer_norm_eps, hf_tower.hidden_act)


def _hf_tower(tower, projection_dim: int) -> Dict:
    return {"hidden_size": tower.hidden_size, "intermediate_size": tower.ffn_hidden_size,
            "num_hidden_layers": tower.num_layers, "num_attention_heads": tower.num_attention_heads,
            "hidden_act": tower.activation, "layer_norm_eps": tower.layernorm_epsilon, "projection_dim": projection_dim}

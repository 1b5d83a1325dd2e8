"""open_clip <-> megaclip for open_clip's plain ``CLIP``: a ViT image tower and a causal text
transformer pooled at the end-of-text token (the OpenAI and LAION ViT models).

The model config is open_clip's dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``, as
``open_clip.get_model_config`` returns it). Tensors map one to one; the attention input projection
is re-laid out (megaclip.convert.qkv) and open_clip's single class embedding [w] becomes megaclip's
[1, w]. A model with a ``logit_bias`` (``init_logit_bias`` set: trained with SigLIP's loss) is a
``model.loss=siglip`` model, its bias mapped both ways. A ``model.loss=catlip`` model, which has no
text tower, exports its image tower alone: the state dict of open_clip's ``model.visual``, with a model
config whose text tower is a tiny meaningless placeholder (open_clip's configs need one).
Neither side needs open_clip installed.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from omegaconf import DictConfig

from megaclip.convert import (CLIP_BPE_TOKENIZER, check_names, dual_encoder, image_only, image_tower, require_clip_bpe,
                              tower_overrides)
from megaclip.convert.qkv import per_head_from_stacked, stacked_from_per_head
from megaclip.model.state import State

# open_clip's dataclass defaults for the keys a config dict may leave out.
_VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                    "image_size": 224, "pool_type": "tok", "norm_kwargs": None}
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                  "mlp_ratio": 4.0, "norm_kwargs": None}
_LAYER_NORM_EPS = 1e-5  # torch's, which open_clip keeps unless norm_kwargs sets eps

# Settings that change the architecture away from megaclip's, with the values that leave it plain.
_BLOCK_PLAIN = {"ls_init_value": (None,), "act_kwargs": (None,), "block_type": (None, "default"),
                "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,),
                "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,)}
_VISION_PLAIN = {**_BLOCK_PLAIN, "attentional_pool": (False,), "no_ln_pre": (False,), "final_ln_after_pool": (False,),
                 "pos_embed_type": ("learnable",), "timm_model_name": (None,)}
_TEXT_PLAIN = {**_BLOCK_PLAIN, "pool_type": ("argmax",), "embed_cls": (False,), "no_causal_mask": (False,),
               "final_ln_after_pool": (False,), "proj_type": ("linear",), "proj_bias": (False,),
               "hf_model_name": (None,), "hf_tokenizer_name": (None,), "tokenizer_mode": (None,),
               "tokenizer_kwargs": (None,)}
_TOP_PLAIN = {"custom_text": (False,), "multimodal_cfg": (None,), "nonscalar_logit_scale": (False,)}
# Settings that do not change the weights or the inference output (training-time or unused ones).
_VISION_INERT = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
                 "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_INERT = {"pad_id", "eos_id", "output_tokens", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
# init_logit_bias (a number) gives the model SigLIP's logit_bias: megaclip's model.loss=siglip.
_TOP_INERT = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias", "cast_dtype",
              "output_dict"}

# The text_cfg of an exported image tower alone: open_clip builds a text tower from every config (of
# one layer at least), so the smallest one, meaningless, a few hundred parameters
_PLACEHOLDER_TEXT_CFG = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}

# (megaclip, open_clip) names of the tensors in one transformer layer.
_LAYER = [("ln_1.weight", "ln_1.weight"), ("ln_1.bias", "ln_1.bias"),
          ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
          ("attn.proj.weight", "attn.out_proj.weight"), ("attn.proj.bias", "attn.out_proj.bias"),
          ("ln_2.weight", "ln_2.weight"), ("ln_2.bias", "ln_2.bias"),
          ("mlp.fc.weight", "mlp.c_fc.weight"), ("mlp.fc.bias", "mlp.c_fc.bias"),
          ("mlp.proj.weight", "mlp.c_proj.weight"), ("mlp.proj.bias", "mlp.c_proj.bias")]
_OUTSIDE_LAYERS = [("logit_scale", "logit_scale"),
                   ("visual.class_embedding", "visual.class_embedding"),
                   ("visual.positional_embedding", "visual.positional_embedding"),
                   ("visual.conv1.weight", "visual.conv1.weight"),
                   ("visual.ln_pre.weight", "visual.ln_pre.weight"), ("visual.ln_pre.bias", "visual.ln_pre.bias"),
                   ("visual.ln_post.weight", "visual.ln_post.weight"), ("visual.ln_post.bias", "visual.ln_post.bias"),
                   ("visual.proj", "visual.proj"),
                   ("text.token_embedding.weight", "token_embedding.weight"),
                   ("text.positional_embedding", "positional_embedding"),
                   ("text.ln_final.weight", "ln_final.weight"), ("text.ln_final.bias", "ln_final.bias"),
                   ("text.text_projection", "text_projection")]


def from_open_clip(state_dict: Dict[str, torch.Tensor], model_cfg: Dict) -> Tuple[Dict, State]:
    """open_clip state dict and model config -> (``model`` config overrides, megaclip full state)."""
    overrides = open_clip_overrides(model_cfg)
    heads = {"visual": overrides["vision"]["num_attention_heads"], "text": overrides["text"]["num_attention_heads"]}
    # attn_mask is a buffer, saved in the state dicts of older open_clip versions
    source = {name: tensor for name, tensor in state_dict.items() if name != "attn_mask"}
    names = _names(overrides["vision"]["num_layers"], overrides["text"]["num_layers"], overrides["loss"] == "siglip")
    check_names(source, [theirs for _, theirs in names], "open_clip")
    full = {}
    for ours, theirs in names:
        tensor = source[theirs]
        if ours.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            tensor = per_head_from_stacked(tensor, heads[ours.split(".")[0]])
        elif ours == "visual.class_embedding":
            tensor = tensor.unsqueeze(0)
        full[ours] = tensor
    return overrides, full


def open_clip_overrides(model_cfg: Dict) -> Dict:
    """megaclip ``model`` config overrides for an open_clip model config (the inverse of
    open_clip_model_config); ValueError for a feature megaclip's model does not have."""
    vision, text = _checked_tower_cfgs(model_cfg)
    activation = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    image_size = _square(vision["image_size"], "vision_cfg.image_size")
    return {
        "output_dim": model_cfg["embed_dim"],
        **_objective_overrides(model_cfg),
        "vision": {
            **tower_overrides(vision["layers"], vision["width"], int(vision["width"] * vision["mlp_ratio"]),
                              vision["width"] // vision["head_width"], _eps(vision, "vision_cfg"), activation),
            "patch_dim": _square(vision["patch_size"], "vision_cfg.patch_size"), "img_h": image_size,
            "img_w": image_size, "num_channels": 3, "class_token_length": 1, "encoder_seq_length": None,
            "global_average_pool": vision["pool_type"] == "avg",
        },
        "text": {
            **tower_overrides(text["layers"], text["width"], int(text["width"] * text["mlp_ratio"]), text["heads"],
                              _eps(text, "text_cfg"), activation),
            "encoder_seq_length": text["context_length"], "vocab_size": text["vocab_size"],
            "tokenizer": dict(CLIP_BPE_TOKENIZER),
        },
    }


def _objective_overrides(model_cfg: Dict) -> Dict:
    """A model with a logit bias (open_clip's init_logit_bias set) was trained with SigLIP's loss."""
    if model_cfg.get("init_logit_bias") is None:
        return {"loss": "clip"}
    initial = {"init_logit_bias": model_cfg["init_logit_bias"]}
    if model_cfg.get("init_logit_scale") is not None:
        initial["init_logit_scale"] = model_cfg["init_logit_scale"]
    return {"loss": "siglip", "siglip": initial}


def to_open_clip(full: State, model_cfg: DictConfig) -> Dict[str, torch.Tensor]:
    """megaclip full state and ``model`` config section -> a state dict that
    ``open_clip.create_model`` of ``open_clip_model_config(model_cfg)`` loads with strict=True; for a
    model without a text tower, one that its ``.visual`` loads with strict=True."""
    open_clip_model_config(model_cfg)  # raises for what open_clip cannot hold
    heads = {"visual": model_cfg.vision.num_attention_heads, "text": model_cfg.text.num_attention_heads}
    names = _names(model_cfg.vision.num_layers, model_cfg.text.num_layers, _is_siglip(model_cfg))
    if image_only(model_cfg):
        names = [(ours, theirs[len("visual."):]) for ours, theirs in names if ours.startswith("visual.")]
    full = image_tower(full, "open_clip", "model.visual") if image_only(model_cfg) else dual_encoder(full, "open_clip")
    check_names(full, [ours for ours, _ in names], "megaclip")
    out = {}
    for ours, theirs in names:
        tensor = full[ours]
        if ours.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            tensor = stacked_from_per_head(tensor, heads[ours.split(".")[0]])
        elif ours == "visual.class_embedding":
            tensor = tensor.squeeze(0)
        out[theirs] = tensor
    return out


def open_clip_model_config(model_cfg: DictConfig) -> Dict:
    """open_clip's model config dict for a megaclip ``model`` config section."""
    v, t = model_cfg.vision, model_cfg.text
    if not image_only(model_cfg):
        require_clip_bpe(model_cfg, "open_clip")
    if v.class_token_length != 1:
        raise ValueError(f"open_clip has one class token; model.vision.class_token_length is {v.class_token_length}")
    if v.num_channels != 3:
        raise ValueError(f"open_clip takes 3-channel images; model.vision.num_channels is {v.num_channels}")
    if v.activation != t.activation and not image_only(model_cfg):
        raise ValueError(f"open_clip has one activation for both towers; vision uses {v.activation}, text {t.activation}")
    vision_cfg = {"image_size": v.img_h, "layers": v.num_layers, "width": v.hidden_size,
                  "head_width": v.hidden_size // v.num_attention_heads,
                  "mlp_ratio": _mlp_ratio(v.hidden_size, v.ffn_hidden_size), "patch_size": v.patch_dim,
                  "pool_type": "avg" if v.global_average_pool else "tok"}
    text_cfg = {"context_length": t.encoder_seq_length, "vocab_size": t.vocab_size, "width": t.hidden_size,
                "heads": t.num_attention_heads, "layers": t.num_layers,
                "mlp_ratio": _mlp_ratio(t.hidden_size, t.ffn_hidden_size)}
    for cfg, tower in ((vision_cfg, v), (text_cfg, t)):
        if tower.layernorm_epsilon != _LAYER_NORM_EPS:
            cfg["norm_kwargs"] = {"eps": tower.layernorm_epsilon}
    siglip = ({"init_logit_scale": model_cfg.siglip.init_logit_scale, "init_logit_bias": model_cfg.siglip.init_logit_bias}
              if _is_siglip(model_cfg) else {})
    if image_only(model_cfg):  # open_clip's configs must name a text tower: a placeholder
        text_cfg = _PLACEHOLDER_TEXT_CFG
    return {"embed_dim": model_cfg.output_dim, "quick_gelu": v.activation == "quick_gelu",
            "vision_cfg": vision_cfg, "text_cfg": text_cfg, **siglip}


def _is_siglip(model_cfg: DictConfig) -> bool:
    return model_cfg.get("loss", "clip") == "siglip"  # configs written before model.loss are CLIP's


def _names(vision_layers: int, text_layers: int, logit_bias: bool) -> List[Tuple[str, str]]:
    """(megaclip, open_clip) names of every tensor of a model with these layer counts."""
    names = list(_OUTSIDE_LAYERS) + ([("logit_bias", "logit_bias")] if logit_bias else [])
    for ours, theirs, layers in (("visual.transformer.layers", "visual.transformer.resblocks", vision_layers),
                                 ("text.transformer.layers", "transformer.resblocks", text_layers)):
        names += [(f"{ours}.{i}.{a}", f"{theirs}.{i}.{b}") for i in range(layers) for a, b in _LAYER]
    return names


def _checked_tower_cfgs(model_cfg: Dict) -> Tuple[Dict, Dict]:
    """The vision and text configs with open_clip's defaults filled in; ValueError for a feature
    megaclip's model does not have."""
    _check_plain(model_cfg, _TOP_PLAIN, _TOP_INERT, "")
    vision = {**_VISION_DEFAULTS, **model_cfg.get("vision_cfg", {})}
    text = {**_TEXT_DEFAULTS, **model_cfg.get("text_cfg", {})}
    if isinstance(vision["layers"], (list, tuple)):
        raise ValueError("open_clip vision_cfg.layers is a list: ResNet image towers are not supported")
    if vision["pool_type"] not in ("tok", "avg"):
        raise ValueError(f"open_clip vision_cfg.pool_type={vision['pool_type']!r} is not supported (tok or avg)")
    _check_plain(vision, _VISION_PLAIN, _VISION_INERT | set(_VISION_DEFAULTS), "vision_cfg.")
    _check_plain(text, _TEXT_PLAIN, _TEXT_INERT | set(_TEXT_DEFAULTS), "text_cfg.")
    return vision, text


def _check_plain(cfg: Dict, plain: Dict, inert: set, prefix: str) -> None:
    for key, value in cfg.items():
        if key in plain and value not in plain[key]:
            raise ValueError(f"open_clip {prefix}{key}={value!r} is not supported")
        if key not in plain and key not in inert:
            raise ValueError(f"open_clip setting {prefix}{key} is not supported")


def _eps(tower_cfg: Dict, name: str) -> float:
    kwargs = tower_cfg["norm_kwargs"] or {}
    if set(kwargs) - {"eps"}:
        raise ValueError(f"open_clip {name}.norm_kwargs {sorted(kwargs)} are not supported (only eps)")
    return kwargs.get("eps", _LAYER_NORM_EPS)


def _square(size, name: str) -> int:
    """An open_clip size given as one int or as (height, width)."""
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"open_clip {name}={list(size)}: non-square images are not supported")
        return size[0]
    return size


def _mlp_ratio(width: int, ffn: int) -> float:
    """The mlp_ratio for which open_clip's int(width * mlp_ratio) is ``ffn``: ffn / width where that
    is exact in floating point, else half a unit above, which truncates to ffn all the same."""
    ratio = ffn / width
    return ratio if int(width * ratio) == ffn else (ffn + 0.5) / width


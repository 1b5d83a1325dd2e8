"""Conversion between megaclip's full model state and open_clip / Hugging Face CLIP models.

Each converter maps a source state dict and config to ``(overrides, full_state)``: ``overrides`` is a
nested dict for the ``model`` config section (the architecture), ``full_state`` the TP-independent
state of megaclip.model.state. The way back takes the full state and the ``model`` section. Features
megaclip's model does not have raise a one-line ValueError naming them.
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from megaclip.config import load_config
from megaclip.config_checks import validate

# Converted models tokenize as the source models do: with CLIP's BPE, which ships with megaclip.
CLIP_BPE_TOKENIZER = {"library": "clip_bpe", "model": None}

# Keeps the torchvision op declarations of import_library alive: a Library undoes them when collected.
_torchvision_ops: Optional[torch.library.Library] = None


def tower_overrides(layers: int, width: int, ffn: int, heads: int, eps: float, activation: str) -> Dict:
    """The settings every megaclip tower takes from a source model."""
    return {"num_layers": layers, "hidden_size": width, "ffn_hidden_size": ffn, "num_attention_heads": heads,
            "layernorm_epsilon": eps, "activation": activation}


def megaclip_config(model_overrides: Dict, tp: int) -> DictConfig:
    """clip_tiny's settings under a converted model's architecture (``model`` section overrides), at TP ``tp``.

    Raises megaclip.config.ConfigError (one line) for an architecture that cannot run at this TP. The
    config names no data: a converted model brings none, and training from it needs
    model.data.train_shards / val_shards. Validation therefore runs before the synthetic set is
    dropped, so that it judges the model and not the missing data."""
    cfg = OmegaConf.merge(load_config("clip_tiny"), {"model": {**model_overrides, "tensor_model_parallel_size": tp}})
    validate(cfg, world_size=tp)
    return OmegaConf.merge(cfg, {"model": {"data": {"synthetic_dir": None}}})


def architecture(model_cfg: DictConfig) -> Dict:
    """The part of a ``model`` config section that converters read and write."""
    return OmegaConf.to_container(OmegaConf.masked_copy(model_cfg, ["vision", "text", "output_dim"]))


def check_names(state: Dict[str, torch.Tensor], expected: Iterable[str], source: str) -> None:
    """ValueError (one line) unless ``state`` holds exactly the tensors named ``expected``."""
    expected = list(expected)
    missing = [n for n in expected if n not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} state does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")


def dual_encoder(full: Dict[str, torch.Tensor], target: str) -> Dict[str, torch.Tensor]:
    """The state without the fusion layers (model.fusion), which the target's CLIP models have no place
    for; says so in one line when there are any."""
    left_out = [name for name in full if name.startswith("fusion.")]
    if left_out:
        print(f"{target} CLIP models have no fusion layers: exporting the dual encoder, "
              f"{len(left_out)} fusion-layer tensors (model.fusion) left out", flush=True)
    return {name: tensor for name, tensor in full.items() if name not in left_out}


def image_only(model_cfg: DictConfig) -> bool:
    """A model without a text tower (model.loss=catlip): it exports as the targets' image tower alone."""
    return model_cfg.get("loss", "clip") == "catlip"  # configs written before model.loss are CLIP's


def image_tower(full: Dict[str, torch.Tensor], target: str, model_kind: str) -> Dict[str, torch.Tensor]:
    """The image tower's tensors of a CatLIP model, saying in one line what the export holds and why its
    classification head is left out (the target has no class head over synsets)."""
    classes = full["catlip_head.weight"].shape[0]
    print(f"a model.loss=catlip model has no text tower: exporting its image tower alone as {target}'s {model_kind}; "
          f"its classification head over {classes} synsets (catlip_head) is left out", flush=True)
    return {name: tensor for name, tensor in full.items() if name.startswith("visual.")}


def require_clip_bpe(model_cfg: DictConfig, target: str) -> None:
    """The targets pool text at CLIP BPE's end-of-text id, so they need models trained with it."""
    library = model_cfg.text.tokenizer.library
    if library != "clip_bpe":
        raise ValueError(f"{target} models tokenize with CLIP BPE; this model uses model.text.tokenizer.library={library}")


def import_library(name: str):
    """``import name`` for open_clip and transformers, which import torchvision.

    PyPI's torchvision wheels are CUDA builds: beside a CPU-only torch their C++ ops cannot load, and
    torchvision's import then fails registering a fake kernel for the missing ``torchvision::nms``.
    Conversion needs none of those ops, so in that case the two ops torchvision registers without
    checking are declared (with no kernel) and torchvision is imported again."""
    global _torchvision_ops
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        _torchvision_ops = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _torchvision_ops.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
    except ImportError:
        pass  # not installed: the library says what it misses, if anything
    return importlib.import_module(name)

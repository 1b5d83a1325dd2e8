"""Training objectives behind one interface, chosen by ``model.loss``.

An objective says which towers and which learned scalars it needs (the model builds exactly those;
the scalars are replicated, kept fp32 under O2, never weight-decayed, and checkpointed, resharded
and converted like any parameter) and turns a micro-batch into the loss over the DP-gathered global
batch: the training loop calls ``objective(model, images, tokens)`` whatever the objective (CatLIP's
"tokens" are its multi-hot targets: the loader encodes captions with the vocabulary instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

from megaclip import distributed
from megaclip.catlip_loss import catlip_loss
from megaclip.losses import ClipLoss
from megaclip.sigmoid_loss import sigmoid_loss

OBJECTIVES = ("clip", "siglip", "catlip")
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


@dataclass(frozen=True)
class Requirements:
    towers: Tuple[str, ...]
    scalars: Dict[str, float]  # learned scalar parameters by name, with their initial values


def requirements(model_cfg) -> Requirements:
    # checkpoints written before model.loss existed are CLIP's
    if model_cfg.get("loss", "clip") == "catlip":
        return Requirements(("image",), {})
    if model_cfg.get("loss", "clip") == "siglip":
        s = model_cfg.siglip
        return Requirements(("image", "text"), {"logit_scale": s.init_logit_scale, "logit_bias": s.init_logit_bias})
    return Requirements(("image", "text"), {"logit_scale": CLIP_INIT_LOGIT_SCALE})


class ClipObjective:
    """CLIP's softmax contrastive loss (megaclip.losses.ClipLoss)."""

    def __init__(self, model_cfg, dp_group):
        self.loss = ClipLoss(model_cfg.local_loss, model_cfg.gather_with_grad, group=dp_group)

    def __call__(self, model, images, tokens):
        return self.loss(*model(images, tokens))


class SigLipObjective:
    """SigLIP's sigmoid loss, text features passed round the DP ring (megaclip.sigmoid_loss)."""

    def __init__(self, model_cfg, dp_group):
        self.dp_group = dp_group

    def __call__(self, model, images, tokens):
        image_features, text_features, logit_scale = model(images, tokens)
        return sigmoid_loss(image_features, text_features, logit_scale, model.logit_bias, self.dp_group)


class CatLipObjective:
    """CatLIP's BCE over the synset classes, on the TP-sharded logits (megaclip.catlip_loss)."""

    def __init__(self, model_cfg, dp_group):
        self.dp_group = dp_group

    def __call__(self, model, images, targets):
        return catlip_loss(model.classify(images), targets, distributed.tp_group(), self.dp_group)


def build_objective(model_cfg, dp_group):
    return {"clip": ClipObjective, "siglip": SigLipObjective, "catlip": CatLipObjective}[model_cfg.loss](model_cfg, dp_group)

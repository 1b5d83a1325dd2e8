"""Training objectives behind one interface, chosen by ``model.loss``.

An objective says which towers and which learned scalars it needs (the model builds exactly those;
the scalars are replicated, kept fp32 under O2, never weight-decayed, and checkpointed, resharded
and converted like any parameter) and splits a batch's loss in two:

- ``features(model, images, batch)``: the towers' outputs for one micro-batch, samples on dim 0; the
  only tensors through which the towers' parameters get gradients (CatLIP's "batch" is its multi-hot
  targets: the loader encodes captions with the vocabulary instead; a tensor without grad, such as
  the targets, rides along);
- ``loss(model, features)``: (total, named terms) over this rank's whole batch (the features of all its
  micro-batches concatenated), DP-gathering inside; the learned scalars get their gradient here, once.

``per_sample`` says whether the loss is a mean of per-sample terms (CatLIP: micro-batches accumulate
plainly) or couples the samples (CLIP, SigLIP: megaclip.accumulation caches the features instead).
Calling the objective is ``loss(model, features(model, images, batch))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

from torch import Tensor, nn

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


class Objective:
    """Subclasses define ``features(model, images, batch) -> Tuple[Tensor, ...]`` and
    ``loss(model, features) -> (Tensor, Dict[str, Tensor])`` as the module's text says."""

    per_sample = False  # True: the loss is a mean of per-sample terms (plain accumulation)

    def __call__(self, model, images: Tensor, batch: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        return self.loss(model, self.features(model, images, batch))

    @staticmethod
    def loss_only_parameters(model) -> List[nn.Parameter]:
        """The parameters only ``loss`` gives gradients to: every trained one outside the towers that
        ``features`` runs (the learned scalars, the fusion layers). One that a tower shares with the loss
        (the captioning head is the text tower's token embedding) is the tower's."""
        in_towers = {id(p) for tower in (model.visual, model.text) if tower is not None for p in tower.parameters()}
        return [p for p in model.parameters() if p.requires_grad and id(p) not in in_towers]


class ClipObjective(Objective):
    """CLIP's softmax contrastive loss (megaclip.losses.ClipLoss)."""

    def __init__(self, model_cfg, dp_group):
        self.clip_loss = ClipLoss(model_cfg.local_loss, model_cfg.gather_with_grad, group=dp_group,
                                  block_size=model_cfg.get("loss_block_size", 0))  # get: configs saved before the key

    def features(self, model, images, tokens):
        return model.encode_image(images), model.encode_text(tokens)

    def loss(self, model, features):
        loss = self.clip_loss(*features, model.logit_scale.exp())
        return loss, {"contrastive": loss}


class SigLipObjective(Objective):
    """SigLIP's sigmoid loss, text features passed round the DP ring (megaclip.sigmoid_loss)."""

    def __init__(self, model_cfg, dp_group):
        self.dp_group, self.block_size = dp_group, model_cfg.get("loss_block_size", 0)

    def features(self, model, images, tokens):
        return model.encode_image(images), model.encode_text(tokens)

    def loss(self, model, features):
        loss = sigmoid_loss(*features, model.logit_scale.exp(), model.logit_bias, self.dp_group, self.block_size)
        return loss, {"contrastive": loss}


class CatLipObjective(Objective):
    """CatLIP's BCE over the synset classes, on the TP-sharded logits (megaclip.catlip_loss)."""

    per_sample = True

    def __init__(self, model_cfg, dp_group):
        self.dp_group = dp_group

    @staticmethod
    def loss_only_parameters(model) -> List[nn.Parameter]:
        return []  # features() runs the head too: the loss alone reaches no parameter

    def features(self, model, images, targets):
        return model.classify(images), targets

    def loss(self, model, features):
        loss = catlip_loss(*features, distributed.tp_group(), self.dp_group)
        return loss, {"classification": loss}


CLASSES = {"clip": ClipObjective, "siglip": SigLipObjective, "catlip": CatLipObjective}


def per_sample(model_cfg) -> bool:
    """Whether model.loss is a mean of per-sample terms (accumulated plainly, without cached features)."""
    return CLASSES[model_cfg.get("loss", "clip")].per_sample


def build_objective(model_cfg, dp_group):
    objective = CLASSES[model_cfg.loss](model_cfg, dp_group)
    if model_cfg.fusion.num_layers:  # the contrastive loss plus the fusion layers' terms
        from megaclip.fusion_objective import FusionObjective  # it builds on Objective, defined here

        objective = FusionObjective(model_cfg, dp_group, objective)
    return objective

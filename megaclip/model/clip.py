"""CLIP: an image tower and a text tower projected into one normalised space, and the learned
scalars of the objective (a temperature; SigLIP's bias too). CatLIP builds the image tower only, with
a classification head over its synset vocabulary, split over the classes across TP ranks."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.model.fusion import FusionEncoder
from megaclip.model.parallel import Linears, normal_init
from megaclip.objectives import requirements
from megaclip.model.text import TextTower
from megaclip.model.vision import VisionTower

MAX_LOGIT_SCALE = math.log(100.0)


class CLIPModel(nn.Module):
    def __init__(self, cfg, num_classes: Optional[int] = None):
        """``cfg`` is the ``model`` section of the config; ``num_classes``: CatLIP's vocabulary size."""
        super().__init__()
        linears = Linears.for_towers(cfg)
        self.visual = VisionTower(cfg.vision, cfg.output_dim, linears)
        self.text = TextTower(cfg.text, cfg.output_dim, linears) if "text" in requirements(cfg).towers else None
        if cfg.get("loss") == "catlip":
            # its input is one embedding per image, not a sequence: never sequence parallel
            head_linears = Linears(cfg.tensor_model_parallel_size, cfg.linear_impl)
            self.catlip_head = head_linears.column(cfg.output_dim, num_classes, normal_init(cfg.output_dim ** -0.5))
        fusion = cfg.get("fusion")  # configs saved before the key existed have none
        if fusion is not None and fusion.num_layers:
            self.fusion = FusionEncoder(cfg, linears, self.text.eot_id)
        for name, initial in requirements(cfg).scalars.items():
            self.register_parameter(name, nn.Parameter(torch.tensor(float(initial))))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def encode_multimodal(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The fused embedding of each image-caption pair (the fusion layers' end-of-text state)."""
        return self.fusion.pooled(self.visual.forward_with_tokens(images)[1], self.text.forward_with_states(tokens)[1], tokens)

    def match_probability(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The probability that each caption describes its image (the ITM head)."""
        logits = self.fusion.match_logits(self.visual.forward_with_tokens(images)[1],
                                          self.text.forward_with_states(tokens)[1], tokens)
        return logits.float().softmax(-1)[:, 1]

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """CatLIP's logits of this TP rank's classes."""
        return self.catlip_head(self.visual(images))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        if hasattr(self, "logit_scale"):  # CatLIP learns no temperature
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

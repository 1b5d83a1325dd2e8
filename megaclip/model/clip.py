"""CLIP: an image tower and a text tower projected into one normalised space, and the learned
scalars of the objective (a temperature; SigLIP's bias too)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.model.parallel import Linears
from megaclip.objectives import requirements
from megaclip.model.text import TextTower
from megaclip.model.vision import VisionTower

MAX_LOGIT_SCALE = math.log(100.0)


class CLIPModel(nn.Module):
    def __init__(self, cfg):
        """``cfg`` is the ``model`` section of the config."""
        super().__init__()
        linears = Linears(cfg.tensor_model_parallel_size, cfg.linear_impl, cfg.sequence_parallel)
        self.visual = VisionTower(cfg.vision, cfg.output_dim, linears)
        self.text = TextTower(cfg.text, cfg.output_dim, linears)
        for name, initial in requirements(cfg).scalars.items():
            self.register_parameter(name, nn.Parameter(torch.tensor(float(initial))))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

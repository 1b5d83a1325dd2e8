"""Image transforms: PIL image -> normalized float tensor [3, H, W], written with PIL and numpy.

They follow torchvision's RandomResizedCrop / Resize + CenterCrop + ToTensor + Normalize,
which CLIP recipes use, without depending on torchvision.
"""

import math
import random
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_normalized_tensor(image: Image.Image, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    pixels = (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 - mean) / std
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _random_resized_crop_box(width: int, height: int, scale: tuple, ratio: tuple, rng) -> tuple:
    """(left, top, right, bottom) of a crop covering `scale` of the area with aspect in `ratio`."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    # no valid draw (extreme aspect ratio): the largest centred crop within `ratio`
    w = min(width, round(height * ratio[1]))
    h = min(height, round(width / ratio[0]))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class TrainTransform:
    """RandomResizedCrop(image_size, scale, bicubic) + ToTensor + Normalize."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], scale=(0.9, 1.0)):
        self.image_size = image_size
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.scale, self.ratio = scale, (3 / 4, 4 / 3)

    def __call__(self, image: Image.Image, rng: Optional[random.Random] = None) -> torch.Tensor:
        # the loader passes a seeded rng so the crops depend only on its seed; default: python's random
        box = _random_resized_crop_box(*image.size, self.scale, self.ratio, rng if rng is not None else random)
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        return _to_normalized_tensor(image, self.mean, self.std)


class EvalTransform:
    """Resize(image_size, bicubic) of the shorter side + CenterCrop + ToTensor + Normalize."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size = image_size
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __call__(self, image: Image.Image, rng: Optional[random.Random] = None) -> torch.Tensor:
        # rng is accepted, and unused, so either transform can be handed to either loader
        size, (width, height) = self.image_size, image.size
        if min(width, height) != size:
            if width <= height:
                width, height = size, int(size * height / width)
            else:
                width, height = int(size * width / height), size
            image = image.resize((width, height), Image.BICUBIC)
        left, top = round((width - size) / 2), round((height - size) / 2)
        image = image.crop((left, top, left + size, top + size))
        return _to_normalized_tensor(image, self.mean, self.std)


def train_transform(image_size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> TrainTransform:
    return TrainTransform(image_size, mean, std)


def eval_transform(image_size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> EvalTransform:
    return EvalTransform(image_size, mean, std)


def transforms_from_config(vision_cfg) -> tuple[TrainTransform, EvalTransform]:
    """(train, eval) transforms for model.vision: img_h pixels square, image_mean/image_std, or
    OpenAI's mean/std when those are null."""
    mean = tuple(vision_cfg.image_mean) if vision_cfg.image_mean else OPENAI_MEAN
    std = tuple(vision_cfg.image_std) if vision_cfg.image_std else OPENAI_STD
    return train_transform(vision_cfg.img_h, mean, std), eval_transform(vision_cfg.img_h, mean, std)

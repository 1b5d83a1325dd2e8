"""Shard-writing helpers and a data config section for the data and evaluation tests."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import webdataset as wds
from PIL import Image


def data_config(**overrides) -> SimpleNamespace:
    """The model.data keys the loaders read, at their defaults."""
    defaults = dict(resampled=False, shuffle_buffer=1000, shuffle_window=4, num_workers=0, prefetch_factor=2,
                    image_keys=["jpg", "jpeg", "png", "webp"], caption_key="txt")
    return SimpleNamespace(**{**defaults, **overrides})


def image_bytes(colour, size=(20, 16), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def noise_image(seed: int, size=(24, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_tar(path, samples) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)

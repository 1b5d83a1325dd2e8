"""Shard-writing helpers and a data config section for the data and evaluation tests."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from megaclip.config import DataConfig


def data_config(**overrides):
    """The model.data config section at its defaults, with overrides."""
    return OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)


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


def write_bad_shards(root) -> str:
    """4 shards: 5 good samples + 1 undecodable image + 1 caption-less + 1 image-less; a shard cut
    between the image and the caption of its 3rd sample; an empty file; a file that is no tar; and
    11 good samples. 18 usable samples in all."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good = lambda i, prefix: {"__key__": f"{prefix}{i:03d}", "png": image_bytes((i * 20, 0, 0)), "txt": f"a red circle {i}"}
    write_tar(root / "a.tar", [good(i, "a") for i in range(5)] + [
        {"__key__": "a100", "png": b"\x89PNG not really", "txt": "broken"},
        {"__key__": "a101", "png": image_bytes((0, 0, 200))},
        {"__key__": "a102", "txt": "no image"}])
    whole = write_tar(root / "whole.tar", [good(i, "t") for i in range(6)])
    with tarfile.open(whole) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "t002.txt").offset  # where its headers begin
    with open(whole, "rb") as f:
        (root / "b.tar").write_bytes(f.read()[:cut])
    os.remove(whole)
    (root / "c.tar").write_bytes(b"")
    (root / "d.tar").write_bytes(b"this is not a tar archive" * 40)
    write_tar(root / "e.tar", [good(i, "e") for i in range(11)])
    return str(root)

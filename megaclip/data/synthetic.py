"""Synthetic image-caption pairs ("a red circle at the top left") written as webdataset shards.

Small enough to generate in seconds, yet a CLIP model has to learn colour, shape and position
to match captions to images, so retrieval on the held-out split says whether training works.

The two-object kind ("a red circle on the left and a blue square on the right") tests binding: its
val split holds every scene beside its swap (the colours exchanged between the two shapes), which
has the same words, so telling the two apart takes knowing which colour goes with which shape.
"""

import glob
import io
import itertools
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from megaclip.data.tokenizer import train_sentencepiece

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
# (phrase, grid row, grid column) on a 3x3 grid
POSITIONS = (
    ("at the top left", 0, 0), ("at the top", 0, 1), ("at the top right", 0, 2),
    ("on the left", 1, 0), ("in the center", 1, 1), ("on the right", 1, 2),
    ("at the bottom left", 2, 0), ("at the bottom", 2, 1), ("at the bottom right", 2, 2),
)

SAMPLES_PER_SHARD = 1024
OBJECTS_FILE = "objects.txt"  # written by the two-object kind only: sets made before it have one object
BINDING_PAIRS = 216  # the two-object val split: 432 scenes, as many as the one-object split's

Scene = tuple  # ((colour, shape, position), ...) in grid order, the order the caption names them


@dataclass(frozen=True)
class SyntheticShards:
    train_shards: str  # brace pattern, e.g. "dir/train-{000000..000015}.tar"
    val_shards: str
    tokenizer_model: str
    train_samples: int
    val_samples: int


def caption(colour: str, shape: str, position: int) -> str:
    return f"a {colour} {shape} {POSITIONS[position][0]}"


def scene_caption(scene: Scene) -> str:
    return " and ".join(caption(*obj) for obj in scene)


def longest_caption_tokens(objects: int) -> int:
    """Tokens of the kind's longest caption: a token per word (the tokenizer's), "and" between the
    objects, the start and end of text."""
    words = max(len(caption(*obj).split()) for obj in itertools.product(COLOURS, SHAPES, range(len(POSITIONS))))
    return objects * words + objects - 1 + 2


def binding_swap(scene: Scene) -> Scene:
    """The two-object scene with the colours exchanged between its shapes: the same words captioned."""
    (colour_a, shape_a, position_a), (colour_b, shape_b, position_b) = scene
    return (colour_b, shape_a, position_a), (colour_a, shape_b, position_b)


def render(colour: str, shape: str, position: int, image_size: int, rng: np.random.Generator) -> Image.Image:
    return render_scene(((colour, shape, position),), image_size, rng)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Each shape in its grid cell, jittered in place and size, on a dark noisy background."""
    image = Image.fromarray(rng.integers(0, 40, size=(image_size, image_size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for colour, shape, position in scene:
        _, row, col = POSITIONS[position]
        cell = image_size / 3
        size = 0.8 * cell * rng.uniform(0.7, 1.0)
        slack = (cell - size) / 2  # keeps the whole shape inside its cell
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, shape, cx, cy, size / 2, COLOURS[colour])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "ring":
        draw.ellipse(box, outline=rgb, width=max(2, round(r / 2.5)))
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    elif shape == "cross":
        t = r / 3  # half the bar thickness
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=rgb)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=rgb)
    else:
        raise ValueError(f"unknown shape '{shape}'")


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 chroma keeps the colour of small shapes from bleeding into the background
    image.save(buffer, format="JPEG", quality=90, subsampling=0)
    return buffer.getvalue()


def _train_scenes(count: int, objects: int, rng: np.random.Generator):
    """Colours and shapes drawn independently (two objects may share them), in distinct cells."""
    colours = list(COLOURS)
    for _ in range(count):
        if objects == 1:
            yield ((colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], int(rng.integers(len(POSITIONS)))),)
        else:
            positions = sorted(int(p) for p in rng.choice(len(POSITIONS), 2, replace=False))
            yield tuple((colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], p) for p in positions)


def _val_scenes(objects: int, rng: np.random.Generator) -> list[Scene]:
    """One object: every colour x shape x position exactly once. Two: BINDING_PAIRS distinct scenes of two
    colours and two shapes, each followed by its binding swap. Every val caption is unique either way."""
    if objects == 1:
        return [(obj,) for obj in itertools.product(COLOURS, SHAPES, range(len(POSITIONS)))]
    colours, drawn = list(COLOURS), {}
    while len(drawn) < BINDING_PAIRS:
        # the first-named colour comes first in COLOURS: a scene's swap is never drawn as a scene itself
        first, second = sorted(rng.choice(len(colours), 2, replace=False))
        shapes = rng.choice(len(SHAPES), 2, replace=False)
        positions = sorted(int(p) for p in rng.choice(len(POSITIONS), 2, replace=False))
        scene = tuple((colours[c], SHAPES[s], p) for c, s, p in zip((first, second), shapes, positions))
        drawn.setdefault(scene, None)  # a dict keeps the order of drawing
    return [each for scene in drawn for each in (scene, binding_swap(scene))]


def _write_split(directory: str, split: str, scenes, samples_per_shard: int, image_size: int, rng) -> list[str]:
    captions = []
    pattern = os.path.join(directory, f"{split}-%06d.tar")
    # a fixed mtime makes the shards byte-identical for the same seed
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0) as sink:
        for index, scene in enumerate(scenes):
            text = scene_caption(scene)
            image = render_scene(scene, image_size, rng)
            sink.write({"__key__": f"{split}-{index:08d}", "jpg": _encode_jpeg(image), "txt": text})
            captions.append(text)
    return captions


def write_synthetic_shards(
    out_dir: str, *, image_size: int = 64, train_samples: int = 16384, samples_per_shard: int = SAMPLES_PER_SHARD, seed: int = 0,
    objects: int = 1,
) -> SyntheticShards:
    """Write train/val shards of one- or two-object scenes and a tokenizer trained on the train captions
    into out_dir.

    Everything goes to a staging directory that is renamed to out_dir only when complete,
    so an interrupted run never leaves a half-written set behind.
    """
    if train_samples < 1 or samples_per_shard < 1:
        raise ValueError(f"train_samples ({train_samples}) and samples_per_shard ({samples_per_shard}) must be positive")
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2, got {objects}")
    out_dir = os.path.normpath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    staging = f"{out_dir}.partial-{os.getpid()}"
    os.makedirs(staging)
    try:
        train_rng, val_rng = (np.random.default_rng([seed, split]) for split in (0, 1))
        captions = _write_split(staging, "train", _train_scenes(train_samples, objects, train_rng),
                                samples_per_shard, image_size, train_rng)
        # val gets as many shards as train so it divides over the same data-parallel ranks
        val_scenes = _val_scenes(objects, np.random.default_rng([seed, 2]))
        val_samples = len(val_scenes)
        val_per_shard = math.ceil(val_samples / math.ceil(train_samples / samples_per_shard))
        _write_split(staging, "val", val_scenes, val_per_shard, image_size, val_rng)
        # A word model: the captions use two dozen words, each then one token, so a caption takes
        # at most 9 tokens with sot/eot (17 with two objects). Subword models with 64 pieces spell
        # words letter by letter.
        train_sentencepiece(captions, tokenizer_path(staging), vocab_size=64, model_type="word")
        if objects != 1:
            with open(os.path.join(staging, OBJECTS_FILE), "w") as f:
                f.write(f"{objects}\n")
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SyntheticShards(
        train_shards=train_shards_pattern(out_dir),
        val_shards=val_shards_pattern(out_dir),
        tokenizer_model=tokenizer_path(out_dir),
        train_samples=train_samples,
        val_samples=val_samples,
    )


def objects_in(out_dir: str) -> int:
    """How many objects the complete set in out_dir puts in each image."""
    path = os.path.join(out_dir, OBJECTS_FILE)
    if not os.path.isfile(path):
        return 1
    with open(path) as f:
        return int(f.read())


def train_shards_pattern(out_dir: str) -> str:
    return _split_pattern(out_dir, "train")


def val_shards_pattern(out_dir: str) -> str:
    return _split_pattern(out_dir, "val")


def tokenizer_path(out_dir: str) -> str:
    return os.path.join(out_dir, "tokenizer.model")


def _split_pattern(out_dir: str, split: str) -> str:
    count = len(glob.glob(os.path.join(glob.escape(out_dir), f"{split}-*.tar")))
    if count == 0:
        raise FileNotFoundError(f"no {split} shards in {out_dir}")
    return os.path.join(out_dir, f"{split}-{{000000..{count - 1:06d}}}.tar")

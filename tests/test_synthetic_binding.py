"""The two-object synthetic set (model.data.synthetic_objects=2): its images show what their captions
say, its val split holds every scene beside its binding swap, and the configs that cannot use it are
one line each. The one-object set's own tests are in test_data.py."""
import io
import re

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from megaclip.config import ConfigError, config_from_argv
from megaclip.data import prepare
from megaclip.data.shards import expand_shards
from megaclip.data.synthetic import (BINDING_PAIRS, COLOURS, OBJECTS_FILE, POSITIONS, objects_in,
                                     write_synthetic_shards)
from megaclip.data.tokenizer import SentencePieceTokenizer

IMAGE_SIZE = 48
OBJECT = re.compile(r"a (\w+) (\w+) (" + "|".join(phrase for phrase, _, _ in POSITIONS) + ")")
TWO_OBJECTS = ["model.data.synthetic_objects=2", "model.data.zeroshot.synthetic=null", "model.text.encoder_seq_length=20"]


@pytest.fixture(scope="module")
def two_objects(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data") / "two", image_size=IMAGE_SIZE, train_samples=64,
                                  samples_per_shard=32, seed=0, objects=2)


@pytest.fixture(autouse=True)
def _isolated_cwd(monkeypatch, tmp_path):
    """The configs name relative paths (runs/, data/): their checks must not see this checkout's."""
    monkeypatch.chdir(tmp_path)


def samples(pattern):
    with wds.WebDataset(pattern, shardshuffle=False) as dataset:
        return [(s["txt"].decode(), np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))) for s in dataset]


def parse(caption):
    """[(colour, shape, position phrase), ...] of a caption, which must be made of nothing else."""
    objects = caption.split(" and ")
    matches = [OBJECT.fullmatch(o) for o in objects]
    assert all(matches), caption
    return [m.groups() for m in matches]


def test_images_show_the_colours_their_captions_name_where_they_name_them(two_objects):
    # A pixel is a shape's when its brightest channel is over 100: the background's is below 40 and
    # every colour has a channel of 205 or more, JPEG at quality 90 moves a channel by far less than
    # the 60 between. The smallest shape (0.56 of a 16-px cell wide) covers ~15 % of its cell;
    # the cell's shape pixels' median names the nearest colour, and the colours are >= 100 apart.
    cell = IMAGE_SIZE // 3
    rgb = np.array(list(COLOURS.values()), dtype=float)
    phrases = {phrase: (row, col) for phrase, row, col in POSITIONS}
    checked = 0
    for caption, image in samples(two_objects.train_shards) + samples(two_objects.val_shards):
        objects = parse(caption)
        assert len(objects) == 2 and phrases[objects[0][2]] < phrases[objects[1][2]]  # distinct cells, in grid order
        named = {phrases[phrase]: colour for colour, _, phrase in objects}
        for row in range(3):
            for col in range(3):
                pixels = image[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3)
                shape = pixels[pixels.max(axis=1) > 100]
                if (row, col) not in named:
                    assert len(shape) < 0.01 * len(pixels), (caption, row, col)
                    continue
                assert len(shape) > 0.08 * len(pixels), (caption, row, col)
                nearest = np.linalg.norm(rgb - np.median(shape, axis=0), axis=1).argmin()
                assert list(COLOURS)[nearest] == named[(row, col)], (caption, row, col)
                checked += 1
    assert checked == 2 * (64 + 2 * BINDING_PAIRS)


def test_every_val_scene_has_its_binding_swap_beside_it(two_objects):
    captions = [caption for caption, _ in samples(two_objects.val_shards)]
    assert len(captions) == len(set(captions)) == two_objects.val_samples == 2 * BINDING_PAIRS
    for scene, swap in zip(captions[::2], captions[1::2]):
        (colour_a, shape_a, place_a), (colour_b, shape_b, place_b) = parse(scene)
        assert colour_a != colour_b and shape_a != shape_b  # else the swap would be the scene itself
        assert parse(swap) == [(colour_b, shape_a, place_a), (colour_a, shape_b, place_b)]
        assert sorted(scene.split()) == sorted(swap.split())  # the same words: only binding tells them apart
    # the val split divides over the same ranks as train
    assert len(expand_shards(two_objects.val_shards)) == len(expand_shards(two_objects.train_shards))


def test_every_two_object_caption_is_a_token_per_word(two_objects):
    tokenizer = SentencePieceTokenizer(two_objects.tokenizer_model, context_length=20)
    captions = [caption for caption, _ in samples(two_objects.val_shards)]
    tokens = tokenizer(captions)
    lengths = (tokens != tokenizer.pad_id).sum(dim=1)
    assert lengths.tolist() == [len(c.split()) + 2 for c in captions]  # start and end of text
    assert int(lengths.max()) <= 17 and not (tokens == 1).any()  # the longest caption; no unknown token


def test_the_set_says_its_kind(two_objects, synthetic):
    assert objects_in(str(two_objects.tokenizer_model).rsplit("/", 1)[0]) == 2
    one_object_dir = str(synthetic.tokenizer_model).rsplit("/", 1)[0]
    assert objects_in(one_object_dir) == 1
    with pytest.raises(FileNotFoundError):
        open(f"{one_object_dir}/{OBJECTS_FILE}")  # the one-object set is written as before, nothing added


def test_two_object_set_is_generated_on_first_use(tmp_path):
    cfg = config_from_argv([f"model.data.synthetic_dir={tmp_path}", "model.data.synthetic_train_samples=16", *TWO_OBJECTS])
    prepare.ensure_synthetic(cfg.model)
    assert objects_in(str(tmp_path)) == 2 and len(parse(samples(f"{tmp_path}/val-000000.tar")[0][0])) == 2


@pytest.mark.parametrize("args,expected", [
    (["model.data.synthetic_objects=3"], "model.data.synthetic_objects must be 1 or 2, got 3"),
    (["model.data.synthetic_objects=2", "model.text.encoder_seq_length=20"],
     "model.data.zeroshot.synthetic=colour names the one object of an image; the two-object synthetic set "
     "(model.data.synthetic_objects=2) has none: set it to null"),
    (["model.data.synthetic_objects=2", "model.data.zeroshot.synthetic=null"],
     "model.text.encoder_seq_length 16 cuts the two-object synthetic captions (up to 17 tokens): set it to 17 or more"),
])
def test_settings_the_two_object_set_cannot_run_are_one_line(args, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        config_from_argv(args)


def test_a_set_of_the_other_kind_is_one_line(two_objects, synthetic):
    two_dir, one_dir = (str(s.tokenizer_model).rsplit("/", 1)[0] for s in (two_objects, synthetic))
    with pytest.raises(ConfigError, match=re.escape(f"model.data.synthetic_dir {one_dir} holds the 1-object synthetic set, "
                                                    "not the model.data.synthetic_objects=2 kind: name another directory")):
        config_from_argv([f"model.data.synthetic_dir={one_dir}", *TWO_OBJECTS])
    with pytest.raises(ConfigError, match=f"{two_dir} holds the 2-object synthetic set, not the model.data.synthetic_objects=1"):
        config_from_argv([f"model.data.synthetic_dir={two_dir}"])
    config_from_argv([f"model.data.synthetic_dir={two_dir}", *TWO_OBJECTS])  # its own kind reads it


def test_the_binding_config_is_valid():
    cfg = config_from_argv(["--config-name", "clip_tiny_fusion_binding"])
    assert cfg.model.data.synthetic_objects == 2 and cfg.model.fusion.num_layers > 0

import hashlib
import io
import itertools
import os
import random
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from megaclip.data.eval_loader import build_eval_loader
from megaclip.data.loader import build_train_loader
from megaclip.data.shards import expand_shards, missing_shards
from megaclip.data.synthetic import COLOURS, POSITIONS, SHAPES, tokenizer_path, write_synthetic_shards
from megaclip.data.tokenizer import SentencePieceTokenizer, build_tokenizer
from megaclip.data.transforms import OPENAI_MEAN, OPENAI_STD, eval_transform, train_transform, transforms_from_config
from tests.data_helpers import data_config
from tests.helpers import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_SAMPLES = len(COLOURS) * len(SHAPES) * len(POSITIONS)


def read_samples(pattern):
    with wds.WebDataset(pattern, shardshuffle=False) as dataset:
        return list(dataset)


def image_hash(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def train_loader(synthetic, tokenizer, num_workers=0, **kw):
    kw = {"dp_rank": 0, "dp_size": 1, "micro_batch_size": 16, "image_transform": train_transform(32),
          "tokenizer": tokenizer, "seed": 0, **kw}
    return build_train_loader(synthetic.train_shards, data_config(shuffle_buffer=64, num_workers=num_workers), **kw)


def eval_loader(shards, tokenizer, **kw):
    kw = {"dp_rank": 0, "dp_size": 1, "batch_size": 100, "image_transform": eval_transform(32), "tokenizer": tokenizer, **kw}
    return build_eval_loader(shards, data_config(), **kw)


def take(loader, n):
    return list(itertools.islice(loader, n))


def test_synthetic_shards(synthetic):
    train_files, val_files = expand_shards(synthetic.train_shards), expand_shards(synthetic.val_shards)
    assert (synthetic.train_samples, synthetic.val_samples) == (256, VAL_SAMPLES) == (256, 432)
    assert len(train_files) == 8 and len(val_files) == 8  # val is split like train
    for path in train_files:
        with tarfile.open(path) as tar:
            assert sorted({name.rsplit(".", 1)[1] for name in tar.getnames()}) == ["jpg", "txt"]
            assert len(tar.getnames()) == 2 * 32
    train, val = read_samples(synthetic.train_shards), read_samples(synthetic.val_shards)
    assert len(train) == 256 and len({s["__key__"] for s in train}) == 256
    val_captions = [s["txt"].decode() for s in val]
    assert len(val_captions) == len(set(val_captions)) == VAL_SAMPLES
    assert "a red circle at the top left" in val_captions and "a cyan ring in the center" in val_captions
    image = Image.open(io.BytesIO(train[0]["jpg"]))
    assert image.size == (32, 32) and image.mode == "RGB"
    # staging directory renamed away, nothing else left next to the output
    assert os.listdir(os.path.dirname(os.path.dirname(synthetic.tokenizer_model))) == ["synthetic"]


def test_synthetic_is_deterministic_and_refuses_to_overwrite(tmp_path):
    first = write_synthetic_shards(tmp_path / "a", image_size=16, train_samples=40, samples_per_shard=20, seed=3)
    second = write_synthetic_shards(tmp_path / "b", image_size=16, train_samples=40, samples_per_shard=20, seed=3)
    other = write_synthetic_shards(tmp_path / "c", image_size=16, train_samples=40, samples_per_shard=20, seed=4)
    read = lambda result: [open(p, "rb").read() for p in expand_shards(result.train_shards)]
    assert read(first) == read(second) != read(other)
    with pytest.raises(FileExistsError):
        write_synthetic_shards(tmp_path / "a", train_samples=8)


@pytest.mark.parametrize("objects", [1, 2])
def test_make_shards_cli(tmp_path, objects):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_shards.py"), "synthetic", "--out", str(out),
                    "--image-size", "16", "--train-samples", "64", "--samples-per-shard", "16", "--objects", str(objects)],
                   check=True, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
    marker = ["objects.txt"] if objects == 2 else []  # the two-object set says its kind; the one-object set never did
    assert sorted(os.listdir(out)) == sorted([f"train-{i:06d}.tar" for i in range(4)] +
                                             [f"val-{i:06d}.tar" for i in range(4)] + ["tokenizer.model", *marker])


def test_tokenizer(synthetic, tokenizer):
    long_caption = "a red circle at the top left " * 20
    tokens = tokenizer(["a blue ring in the center", long_caption])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    assert (tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id) == (0, 2, 3)
    assert tokens[:, 0].tolist() == [2, 2]
    lengths = (tokens != 0).sum(dim=1)
    assert lengths[1] == 16  # truncated to the full context, eot kept as the last token
    assert tokens[torch.arange(2), lengths - 1].tolist() == [3, 3]
    assert (tokens[0, lengths[0]:] == 0).all() and lengths[0] < 16
    assert tokenizer.processor.decode(tokens[0, 1 : lengths[0] - 1].tolist()) == "a blue ring in the center"
    assert tokenizer.vocab_size == tokenizer.processor.get_piece_size() <= 64
    assert int(tokens.max()) < tokenizer.vocab_size


def test_every_synthetic_caption_fits_without_unknown_tokens(synthetic, tokenizer):
    captions = [s["txt"].decode() for s in read_samples(synthetic.val_shards)]
    tokens = tokenizer(captions)
    lengths = (tokens != tokenizer.pad_id).sum(dim=1)
    assert int(lengths.max()) == 9  # "a purple triangle at the bottom right": one token per word
    assert not (tokens == 1).any()  # unk id
    assert synthetic.tokenizer_model == tokenizer_path(os.path.dirname(synthetic.tokenizer_model))


def test_build_tokenizer(synthetic):
    assert build_tokenizer("sentencepiece", synthetic.tokenizer_model, 8)(["a red cross"]).shape == (1, 8)
    with pytest.raises(ValueError, match="unknown tokenizer library 'clip' \\(choose sentencepiece or clip_bpe\\)"):
        build_tokenizer("clip", synthetic.tokenizer_model, 8)
    with pytest.raises(ValueError, match="context_length"):
        SentencePieceTokenizer(synthetic.tokenizer_model, 1)


def test_sentencepiece_model_with_another_end_of_text_id_is_refused(tmp_path):
    # the text tower pools at id 3, where train_sentencepiece puts the end of text
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red circle", "a blue square"] * 50), vocab_size=24,
                                   hard_vocab_limit=False, model_prefix=str(tmp_path / "other"),
                                   pad_id=0, unk_id=1, bos_id=3, eos_id=2, minloglevel=2)
    with pytest.raises(ValueError, match="eos id 3 .* has pad 0 bos 3 eos 2"):
        SentencePieceTokenizer(str(tmp_path / "other.model"), 8)


def test_data_parallel_ranks_see_disjoint_shards_covering_an_epoch(synthetic, tokenizer):
    every_image = {image_hash(image) for batch in eval_loader(synthetic.train_shards, tokenizer) for image in batch.images}
    assert len(every_image) == 256
    seen = []
    for rank in range(2):
        # one epoch of a rank: 4 shards x 32 samples / 16 per batch
        batches = take(train_loader(synthetic, tokenizer, dp_rank=rank, dp_size=2, image_transform=eval_transform(32)), 8)
        assert all(images.shape == (16, 3, 32, 32) and tokens.shape == (16, 16) for images, tokens in batches)
        seen.append([image_hash(image) for images, _ in batches for image in images])
        assert len(set(seen[rank])) == 128
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == every_image


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epochs_reshuffle_the_same_samples(synthetic, tokenizer, num_workers):
    batches = take(train_loader(synthetic, tokenizer, image_transform=eval_transform(32), num_workers=num_workers), 32)
    epochs = [[image_hash(image) for images, _ in batches[i : i + 16] for image in images] for i in (0, 16)]
    assert set(epochs[0]) == set(epochs[1]) and len(set(epochs[0])) == 256
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_tensor_parallel_peers_get_identical_batches(synthetic, tokenizer, num_workers):
    # two epochs of rank 1, as the two tensor-parallel ranks sharing dp_rank 1 would build it
    peers = [take(train_loader(synthetic, tokenizer, dp_rank=1, dp_size=2, num_workers=num_workers), 16)
             for _ in range(2)]
    for (images_a, tokens_a), (images_b, tokens_b) in zip(*peers):
        assert torch.equal(images_a, images_b) and torch.equal(tokens_a, tokens_b)
    other_seed = take(train_loader(synthetic, tokenizer, dp_rank=1, dp_size=2, seed=1), 1)
    assert not torch.equal(other_seed[0][0], peers[0][0][0])


def test_too_few_shards(synthetic, tokenizer):
    with pytest.raises(ValueError, match="8 train shards cannot feed 4 data-parallel ranks x 4 loader workers"):
        train_loader(synthetic, tokenizer, dp_rank=0, dp_size=4, num_workers=4)
    with pytest.raises(ValueError, match="need at least 16 shards"):
        train_loader(synthetic, tokenizer, dp_rank=0, dp_size=16)


def test_eval_loader_splits_val_and_keeps_last_batch(synthetic, tokenizer):
    captions = []
    for rank in range(2):
        batches = list(eval_loader(synthetic.val_shards, tokenizer, dp_rank=rank, dp_size=2, batch_size=50))
        assert [len(b.captions) for b in batches] == [50, 50, 50, 50, 16]  # 4 shards x 54 samples
        assert all(len(b.images) == len(b.tokens) == len(b.captions) == len(b.keys) for b in batches)
        assert all(b.caption_image.tolist() == list(range(len(b.images))) and b.labels is None for b in batches)
        captions.append({caption for b in batches for caption in b.captions})
    assert not captions[0] & captions[1] and len(captions[0] | captions[1]) == VAL_SAMPLES


def test_bad_samples_are_skipped(tmp_path, synthetic, tokenizer):
    good = read_samples(synthetic.val_shards)[:3]
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as sink:
        for sample in good:
            sink.write({"__key__": sample["__key__"], "jpg": sample["jpg"], "txt": sample["txt"]})
        sink.write({"__key__": "broken", "jpg": b"not a jpeg", "txt": "a red cross"})
        sink.write({"__key__": "uncaptioned", "jpg": good[0]["jpg"]})
    loader = eval_loader(str(tmp_path / "mixed.tar"), tokenizer, batch_size=8)
    batches = list(loader)
    assert batches[0].captions == [s["txt"].decode() for s in good] and len(batches) == 1
    assert loader.skipped == {"bad_images": 1, "missing_captions": 1}


def test_shard_expansion(synthetic, tmp_path):
    directory = os.path.dirname(synthetic.tokenizer_model)
    assert len(expand_shards(directory)) == 16  # a directory means all its tars: train and val
    assert expand_shards([synthetic.train_shards, synthetic.val_shards]) == sorted(expand_shards(directory))
    pattern = os.path.join(directory, "train-{000006..000009}.tar")
    assert [os.path.basename(p) for p in missing_shards(pattern)] == ["train-000008.tar", "train-000009.tar"]
    assert len(expand_shards(pattern)) == 2
    with pytest.raises(FileNotFoundError, match="2 shard"):
        eval_loader(pattern, None, image_transform=None)


def test_transforms_normalize_with_given_mean_and_std():
    colour = np.array([200, 100, 50], np.float32)
    image = Image.new("RGB", (48, 40), tuple(int(c) for c in colour))
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 1.0)
    expected = (colour / 255 - np.array(mean)) / np.array(std)
    for transform in (train_transform(24, mean, std), eval_transform(24, mean, std)):
        pixels = transform(image)
        assert pixels.shape == (3, 24, 24) and pixels.dtype == torch.float32
        # a plain colour resizes to itself; then (x / 255 - mean) / std, |values| < 4, in three fp32
        # roundings on each side (<= 3 * 4 * 6e-8 each): 1e-5 is above them and below one grey level
        assert torch.allclose(pixels, torch.tensor(expected, dtype=torch.float32).view(3, 1, 1).expand(3, 24, 24), atol=1e-5)
    assert OPENAI_MEAN[0] == 0.48145466 and OPENAI_STD[2] == 0.27577711


def test_eval_transform_center_crops_and_train_crop_follows_rng():
    gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3))
    image = Image.fromarray(gradient)  # 64 wide, 32 high: only the centre crop is kept
    expected = (gradient[:, 16:48].astype(np.float32) / 255 - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32)
    # the kept pixels are not resampled; (x / 255 - mean) / std, |values| < 2.2, in three fp32 roundings
    # on each side (each <= 2.2 * 6e-8): within 1e-6 of each other
    assert torch.allclose(eval_transform(32)(image), torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)
    square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    crop = train_transform(32)
    assert torch.equal(crop(square, random.Random(5)), crop(square, random.Random(5)))
    assert not torch.equal(crop(square, random.Random(5)), crop(square, random.Random(6)))


def test_transforms_from_config_honour_image_size_mean_and_std():
    image = Image.new("RGB", (50, 40), (200, 100, 50))
    pixel = np.array([200, 100, 50], np.float32) / 255
    cfg = small_config("model.vision.img_h=24", "model.vision.img_w=24",
                       "model.vision.image_mean=[0.5,0.4,0.3]", "model.vision.image_std=[0.25,0.5,1.0]")
    for transform in transforms_from_config(cfg.model.vision):
        pixels = transform(image)
        assert pixels.shape == (3, 24, 24)
        expected = (pixel - np.array([0.5, 0.4, 0.3])) / np.array([0.25, 0.5, 1.0])  # fp32 roundings as above
        assert torch.allclose(pixels, torch.tensor(expected, dtype=torch.float32).view(3, 1, 1).expand(3, 24, 24), atol=1e-5)
    defaults = small_config()  # 16 px, mean and std null: OpenAI's
    for transform in transforms_from_config(defaults.model.vision):
        pixels = transform(image)
        expected = (pixel - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)  # ~1 each: rtol 1e-5 >> fp32 rounding
        assert pixels.shape == (3, 16, 16) and torch.allclose(pixels[:, 0, 0], torch.tensor(expected, dtype=torch.float32))

"""The command-line tools: make_shards folder, train_tokenizer, evaluate."""
import csv
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from megaclip.checkpoint import write_model_checkpoint
from megaclip.data.eval_loader import build_eval_loader
from megaclip.data.synthetic import write_synthetic_shards
from megaclip.data.tokenizer import SentencePieceTokenizer
from megaclip.data.transforms import eval_transform
from megaclip.model import CLIPModel
from megaclip.model.state import full_state_dict
from tests.data_helpers import data_config, noise_image
from tests.helpers import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args) -> str:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", args[0]), *map(str, args[1:])],
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", image_size=32,
                                  train_samples=64, samples_per_shard=32, seed=0)


def test_make_shards_folder_round_trip(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    originals = {}
    for i in range(7):
        name = f"sub/{i}.png" if i % 2 else f"{i}.JPEG"
        noise_image(i, size=(20 + i, 18)).save(images / name, format="PNG" if i % 2 else "JPEG", quality=95)
        originals[name] = (f"caption number {i}", np.asarray(Image.open(images / name).convert("RGB")))
    (images / "anim.gif").write_bytes(b"GIF89a")
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "text"])
        writer.writerows([(name, caption) for name, (caption, _) in originals.items()])
        writer.writerows([("anim.gif", "a gif"), ("gone.jpg", "missing"), ("sub/1.png", "  ")])
    out = run_tool("make_shards.py", "folder", "--images", images, "--captions", tmp_path / "captions.csv",
                   "--out", tmp_path / "shards", "--file-column", "filename", "--caption-column", "text",
                   "--val-fraction", "0.3", "--samples-per-shard", "2")
    assert "wrote 5 train samples" in out and "wrote 2 val samples" in out
    assert "1 (unsupported_extension), 1 (missing_file), 1 (empty_caption)" in out
    assert sorted(os.listdir(tmp_path / "shards")) == [f"train-{i:06d}.tar" for i in range(3)] + \
        [f"val-{i:06d}.tar" for i in range(1)]
    transform, seen = eval_transform(16), {}
    for split, last in (("train", 2), ("val", 0)):
        pattern = str(tmp_path / "shards" / f"{split}-{{000000..{last:06d}}}.tar")
        loader = build_eval_loader(pattern, data_config(), dp_rank=0, dp_size=1, batch_size=4,
                                   image_transform=transform, tokenizer=lambda texts: texts)
        for batch in loader:
            assert batch.tokens == batch.captions  # one caption per image
            for image, caption in zip(batch.images, batch.captions):
                name = next(n for n, (c, _) in originals.items() if c == caption)
                assert torch.equal(image, transform(Image.open(images / name)))
                seen[name] = split
        assert loader.skipped == {}
    assert sorted(seen) == sorted(originals)  # each exactly once (the row with a blank caption is left out)
    assert list(seen.values()).count("val") == 2
    # the image bytes travel unchanged
    sample = next(iter(wds.WebDataset(str(tmp_path / "shards" / "train-000000.tar"), shardshuffle=False)))
    name = re.search(r'"file": "([^"]+)"', sample["json"].decode()).group(1)
    extension = "png" if name.endswith(".png") else "jpg"
    assert sample[extension] == (images / name).read_bytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample[extension])).convert("RGB")), originals[name][1])


def test_train_tokenizer_on_shard_captions(tmp_path, synthetic):
    out = run_tool("train_tokenizer.py", "--shards", synthetic.train_shards, "--out", tmp_path / "tok.model",
                   "--vocab-size", "40", "--model-type", "word")
    size = int(re.search(r"(\d+) pieces", out).group(1))
    assert f"model.text.vocab_size>={size}" in out
    tokenizer = SentencePieceTokenizer(str(tmp_path / "tok.model"), context_length=12)
    assert tokenizer.vocab_size == size <= 40
    tokens = tokenizer(["a red circle at the top left"])
    assert (tokens != 0).sum() == 9 and not (tokens == 1).any()  # one piece per word, no unknowns


def test_evaluate_a_checkpoint(tmp_path, synthetic):
    cfg = small_config("model.text.vocab_size=64", "model.text.encoder_seq_length=16",
                       f"model.data.synthetic_dir={os.path.dirname(synthetic.tokenizer_model)}")
    write_model_checkpoint(tmp_path / "ckpt", full_state_dict(CLIPModel(cfg.model), 64), cfg, tp=1)
    folder = tmp_path / "folder"
    for name in ("circle", "square"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            noise_image(i).save(folder / name / f"{i}.png")
    (tmp_path / "classes.txt").write_text("0\tcircle\n1\tsquare\n")
    out = run_tool("evaluate.py", "--checkpoint", tmp_path / "ckpt", "--synthetic-zeroshot", "colour",
                   "--zeroshot-folder", folder, "--classes", tmp_path / "classes.txt", "--batch-size", "100")
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert list(lines) == ["retrieval", "zeroshot synthetic colour", "zeroshot folder"]
    retrieval = dict(item.split("=") for item in lines["retrieval"].split())
    assert float(retrieval["chance_R@1"]) == pytest.approx(1 / 432, abs=1e-4)
    assert all(0 <= float(retrieval[f"{d}_R@{k}"]) <= 1 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert 1 <= float(retrieval["i2t_mean_rank"]) <= 432
    assert re.fullmatch(r"top1=[\d.]+ top5=[\d.]+ images=432", lines["zeroshot synthetic colour"])
    assert re.fullmatch(r"top1=[\d.]+ top5=1.0000 images=6", lines["zeroshot folder"])  # 2 classes


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic):
    cfg = small_config("model.text.vocab_size=64", "model.text.encoder_seq_length=16", "model.vision.encoder_seq_length=null",
                       f"model.data.synthetic_dir={os.path.dirname(synthetic.tokenizer_model)}")
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    write_model_checkpoint(root, full_state_dict(CLIPModel(cfg.model), 64), cfg, tp=1)
    return root


def _truncated_checkpoint(tmp_path, checkpoint):
    copy = shutil.copytree(checkpoint, tmp_path / "ckpt")
    shard = copy / "step_0000000" / "model" / "tp_00.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return ["--checkpoint", copy]


def _empty_val_shards(tmp_path, checkpoint):
    (tmp_path / "val-0.tar").write_bytes(b"")
    return ["--checkpoint", checkpoint, "--val-shards", tmp_path / "val-0.tar"]


def _checkpoint_with(tmp_path, checkpoint, model):
    """The checkpoint with other ``model`` settings, as a run elsewhere or a converter writes them."""
    copy = shutil.copytree(checkpoint, tmp_path / "other")
    config = copy / "step_0000000" / "config.yaml"
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(config), {"model": model}), config)
    return ["--checkpoint", copy]


def _class_folder(tmp_path):
    for name in ("circle", "square"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        noise_image(0).save(tmp_path / "folder" / name / "0.png")
    return tmp_path / "folder"


BAD_EVALUATE_INPUT = {  # case: (arguments, the error line)
    "missing checkpoint": (lambda tmp, ckpt: ["--checkpoint", tmp / "nowhere"], r"no checkpoint at .*nowhere"),
    "empty checkpoint directory": (lambda tmp, ckpt: ["--checkpoint", tmp], r"no checkpoint at "),
    "truncated checkpoint": (_truncated_checkpoint, r"checkpoint file unreadable: .*tp_00\.pt"),
    "empty val shards": (_empty_val_shards, r"no usable samples in the val split .*val-0\.tar \(skipped: bad_shards=1\)"),  # after a warning
    "data of a run elsewhere": (lambda tmp, ckpt: _checkpoint_with(tmp, ckpt, {"data": {"synthetic_dir": str(tmp / "gone")}}),
                                r"no train shards in .*gone"),
    "tokenizer of a run elsewhere": (
        lambda tmp, ckpt: _checkpoint_with(tmp, ckpt, {"text": {"tokenizer": {"model": str(tmp / "gone.model")}}}),
        r"sentencepiece tokenizer model not found: .*gone\.model"),
    "no val split named": (lambda tmp, ckpt: _checkpoint_with(tmp, ckpt, {"data": {"synthetic_dir": None}}),
                           r".*other names no val split \(model\.data\.val_shards\): pass --val-shards"),
    "val shards that do not exist": (lambda tmp, ckpt: ["--checkpoint", ckpt, "--val-shards", tmp / "v-{0..1}.tar"],
                                     r"2 shard\(s\) of .* do not exist"),
    "synthetic zero-shot on the two-object set": (
        lambda tmp, ckpt: [*_checkpoint_with(tmp, ckpt, {"data": {"synthetic_objects": 2}}), "--synthetic-zeroshot", "colour"],
        r"--synthetic-zeroshot labels the one object of a synthetic image; .*other's val split is the two-object set"),
    "missing class file": (lambda tmp, ckpt: ["--checkpoint", ckpt, "--zeroshot-folder", _class_folder(tmp),
                                              "--classes", tmp / "classes.txt"], r"\[Errno 2\] No such file or directory: .*classes\.txt"),
    "class file that does not fit the folder": (
        lambda tmp, ckpt: ["--checkpoint", ckpt, "--zeroshot-folder", _class_folder(tmp), "--classes",
                           (tmp / "three.txt").write_text("a\nb\nc\n") and tmp / "three.txt"],
        r".*folder has 2 class folders, .*three\.txt 3 names"),
}


@pytest.mark.parametrize("case", BAD_EVALUATE_INPUT)
def test_evaluate_bad_input_is_one_line_and_exit_code_2(case, tmp_path, checkpoint, capsys):
    arguments, message = BAD_EVALUATE_INPUT[case]
    code = load_tool("evaluate").main([str(a) for a in arguments(tmp_path, checkpoint)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2, err
    if case == "empty val shards":  # the data's own line names the shard first
        assert err.pop(0).startswith("megaclip: warning: skipping shard ")
    assert len(err) == 1 and re.match(r"evaluate: error: " + message, err[0]), err


def test_evaluate_error_exit_code_of_the_process(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--checkpoint", str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("evaluate: error: no checkpoint at ")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_conversion_refuses_a_training_runs_checkpoint_directory(tmp_path, checkpoint, capsys):
    # a run's checkpoints: step directories with optimizer and training state, `latest` pointing at one
    run = tmp_path / "run" / "checkpoints"
    step = shutil.copytree(checkpoint / "step_0000000", run / "step_0000100")
    for part in ("optim/tp_00_dp_00.pt", "train/rank_00000.pt"):
        (step / part).parent.mkdir()
        torch.save({}, step / part)
    (run / "latest").write_text("step_0000100\n")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    convert = load_tool("convert_checkpoint")
    reshard = ["megaclip-reshard", "--checkpoint", str(checkpoint), "--tp", "2", "--out"]
    assert convert.main(reshard + [str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"convert_checkpoint: error: {run} holds a training run's checkpoints (step_0000100)")
    assert err.count("\n") == 1
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert (run / "latest").read_text() == "step_0000100\n"
    # beside the run is fine, and so is converting again over an earlier conversion
    for _ in range(2):
        assert convert.main(reshard + [str(run.parent / "tp2")]) == 0
    assert (run.parent / "tp2" / "latest").read_text() == "step_0000000\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_evaluate_on_a_gpu_that_is_not_there(checkpoint, capsys):
    assert load_tool("evaluate").main(["--checkpoint", str(checkpoint), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "evaluate: error: --device cuda: no GPU is available\n"

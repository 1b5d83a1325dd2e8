"""Conversion to and from open_clip and Hugging Face CLIP: the same features at TP=1 and TP=2, exact
weight round trips, the command-line tool end to end, and one-line errors."""
from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from megaclip import distributed
from megaclip.checkpoint import CheckpointError, read_full_model_state, write_model_checkpoint
from megaclip.checkpoint.model import model_shard_path
from megaclip.config import ConfigError
from megaclip.convert import import_library, megaclip_config
from megaclip.convert.hf import from_hf, to_hf, transformers
from megaclip.convert.open_clip import from_open_clip, open_clip_model_config, open_clip_overrides, to_open_clip
from megaclip.convert.qkv import per_head_from_separate, per_head_from_stacked, separate_from_per_head, stacked_from_per_head
from megaclip.data.clip_bpe import ClipBpeTokenizer
from megaclip.model import CLIPModel
from megaclip.model.state import load_full_state_dict
from tests.distributed import run_distributed
from tests.helpers import small_config

open_clip = import_library("open_clip")

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "convert_checkpoint.py"
# The second caption's "!??" holds CLIP BPE's id 0 ("!"), which is also the padding id.
CAPTIONS = ["a photo of a cat", "Two dogs playing in the snow!?? «très» joli! 🐕 &amp; a very happy owner"]
SMALL_OPEN_CLIP = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
SMALL_HF = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "hidden_act": "gelu"},
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"},
    "projection_dim": 16,
}


@torch.no_grad()
def jitter(model, seed: int):
    """Random init leaves biases at zero and norms at one; noise makes the layout of every tensor count."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def batch(image_size: int):
    """Two random images and two real CLIP BPE token rows, one with id 0 before its end of text."""
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    tokens = ClipBpeTokenizer(77)(CAPTIONS)
    assert 0 in tokens[1, : tokens[1].argmax()]
    return images, tokens


def megaclip_features(model_cfg, full, images, tokens):
    """Normalised image and text features of a megaclip model at model_cfg's TP size (on this rank)."""
    tp = model_cfg.tensor_model_parallel_size
    model = CLIPModel(model_cfg).eval()
    load_full_state_dict(model, full, tp, distributed.tp_rank() if tp > 1 else 0)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def at_tp(model_cfg, tp: int):
    return OmegaConf.merge(model_cfg, {"tensor_model_parallel_size": tp})


def assert_same_features(ours, theirs):
    # The same weights through other kernels (SDPA vs nn.MultiheadAttention or HF's attention, the
    # per-head QKV, TP partial sums): fp32 sums in other orders over widths up to 768 (ViT-B-32) and
    # 12 layers; rounding of random sign, ~sqrt(n) eps per sum, leaves unit feature vectors within 1e-5.
    for a, b in zip(ours, theirs):
        assert (a - b).norm(dim=-1).max() <= 1e-5 * b.norm(dim=-1).min()
        assert (b[0] - b[1]).norm() > 0.1  # two different inputs: the comparison is not vacuous


def assert_equal_states(a, b):
    # Conversion only renames, reshapes and permutes rows (QKV layouts): no arithmetic, so bitwise.
    assert a.keys() == b.keys()
    assert [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))] == []


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_open_clip(tmp_path_factory):
    """(random open_clip model, its model config, its model name) of a small QuickGELU config."""
    folder = tmp_path_factory.mktemp("small_open_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_OPEN_CLIP}))
    name = f"local-dir:{folder}"
    torch.manual_seed(0)
    return jitter(open_clip.create_model(name), 1), open_clip.get_model_config(name), name


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return jitter(transformers.CLIPModel(transformers.CLIPConfig(**SMALL_HF)), 2)


def test_qkv_layouts_move_whole_heads():
    heads, head_dim, width = 2, 3, 6
    # row r of [Wq; Wk; Wv] holds (which, head, dim) = divmod: value 100 * which + 10 * head + dim
    rows = torch.tensor([100 * w + 10 * h + d for w in range(3) for h in range(heads) for d in range(head_dim)])
    stacked = rows[:, None].expand(-1, width).float()
    per_head = per_head_from_stacked(stacked, heads)
    assert per_head[:, 0].tolist() == [100 * w + 10 * h + d for h in range(heads) for w in range(3) for d in range(head_dim)]
    assert torch.equal(stacked_from_per_head(per_head, heads), stacked)
    assert torch.equal(per_head_from_stacked(rows, heads), per_head[:, 0].long())  # biases alike
    q, k, v = separate_from_per_head(per_head, heads)
    assert q[:, 0].tolist() == [0, 1, 2, 10, 11, 12] and v[:, 0].tolist() == [200, 201, 202, 210, 211, 212]
    assert torch.equal(per_head_from_separate(q, k, v, heads), per_head)


@pytest.mark.parametrize("source", ["small", "ViT-B-32"])
def test_open_clip_features_and_round_trip(source, small_open_clip):
    if source == "small":
        model, model_cfg, _ = small_open_clip
    else:
        torch.manual_seed(0)
        model, model_cfg = jitter(open_clip.create_model("ViT-B-32"), 3), open_clip.get_model_config("ViT-B-32")
    overrides, full = from_open_clip(model.state_dict(), model_cfg)
    images, tokens = batch(model_cfg["vision_cfg"]["image_size"])
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    cfg = megaclip_config(overrides, 1)
    assert cfg.model.text.tokenizer.library == "clip_bpe" and cfg.model.data.synthetic_dir is None
    assert_same_features(megaclip_features(cfg.model, full, images, tokens), expected)
    for rank in run_distributed(megaclip_features, 2, 2, at_tp(cfg.model, 2), full, images, tokens):
        assert_same_features(rank, expected)
    assert_equal_states(to_open_clip(full, cfg.model), model.state_dict())
    assert open_clip_overrides(open_clip_model_config(cfg.model)) == overrides


def test_every_plain_open_clip_config_round_trips():
    converted = []
    for name in open_clip.list_models():
        try:
            overrides = open_clip_overrides(open_clip.get_model_config(name))
        except ValueError:  # a feature megaclip lacks; named in one line (tested below)
            continue
        cfg = megaclip_config(overrides, 1)
        assert open_clip_overrides(open_clip_model_config(cfg.model)) == overrides, name
        converted.append(name)
    assert {"ViT-B-32", "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14-quickgelu"} <= set(converted)


@pytest.mark.parametrize("config_as", ["CLIPConfig", "dict"])
def test_hf_features_and_round_trip(config_as, hf_model):
    config = hf_model.config if config_as == "CLIPConfig" else hf_model.config.to_dict()
    overrides, full = from_hf(hf_model.state_dict(), config)
    images, tokens = batch(hf_model.config.vision_config.image_size)
    with torch.no_grad():  # transformers 5 returns an output object, 4.x the features
        outputs = hf_model.get_image_features(pixel_values=images), hf_model.get_text_features(input_ids=tokens)
    expected = [F.normalize(o if torch.is_tensor(o) else o.pooler_output, dim=-1) for o in outputs]
    cfg = megaclip_config(overrides, 1)
    assert (cfg.model.vision.activation, cfg.model.text.activation) == ("quick_gelu", "gelu")
    assert_same_features(megaclip_features(cfg.model, full, images, tokens), expected)
    for rank in run_distributed(megaclip_features, 2, 2, at_tp(cfg.model, 2), full, images, tokens):
        assert_same_features(rank, expected)
    state_dict, hf_config = to_hf(full, cfg.model)
    assert_equal_states(state_dict, hf_model.state_dict())
    assert from_hf(state_dict, hf_config)[0] == overrides


def test_tool_open_clip_end_to_end(small_open_clip, tmp_path):
    model, _, name = small_open_clip
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    proc = subprocess.run([sys.executable, str(TOOL), "open_clip-to-megaclip", "--model-name", name,
                           "--pretrained", str(tmp_path / "weights.pt"), "--tp", "2", "--out", str(tmp_path / "ckpt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert model_shard_path(tmp_path / "ckpt" / "step_0000000", 1).is_file()

    full, cfg = read_full_model_state(tmp_path / "ckpt")  # written at TP=2, read back at TP=1
    assert cfg.model.tensor_model_parallel_size == 2
    images, tokens = batch(32)
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    assert_same_features(megaclip_features(at_tp(cfg.model, 1), full, images, tokens), expected)

    tool = load_tool()
    assert tool.main(["megaclip-reshard", "--checkpoint", str(tmp_path / "ckpt"), "--tp", "1",
                      "--out", str(tmp_path / "tp1")]) == 0
    resharded, resharded_cfg = read_full_model_state(tmp_path / "tp1")
    assert resharded_cfg.model.tensor_model_parallel_size == 1
    assert_equal_states(resharded, full)

    exported = tmp_path / "export" / "megaclip_export.pt"
    assert tool.main(["megaclip-to-open_clip", "--checkpoint", str(tmp_path / "tp1"), "--out", str(exported)]) == 0
    open_clip.add_model_config(exported.with_suffix(".json"))
    reloaded = open_clip.create_model("megaclip_export", pretrained=str(exported))  # loads strictly
    assert_equal_states(reloaded.state_dict(), model.state_dict())


def test_tool_hf_round_trip(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    tool = load_tool()
    assert tool.main(["hf-to-megaclip", "--hf-dir", str(tmp_path / "hf"), "--tp", "2", "--out", str(tmp_path / "ckpt")]) == 0
    assert tool.main(["megaclip-to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    assert_equal_states(transformers.CLIPModel.from_pretrained(tmp_path / "back").state_dict(), hf_model.state_dict())


def test_loading_another_architecture_fails_in_one_line(small_open_clip):
    model, model_cfg, _ = small_open_clip
    overrides, full = from_open_clip(model.state_dict(), model_cfg)
    fewer_layers = copy.deepcopy(overrides)
    fewer_layers["text"]["num_layers"] = 1
    with pytest.raises(ValueError, match=r"does not match the model: missing \[\], unexpected \['text.transformer.layers.1") as e:
        load_full_state_dict(CLIPModel(megaclip_config(fewer_layers, 1).model), full, 1, 0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"visual.proj has shape \(64, 32\), the model \(64, 16\)$") as e:
        load_full_state_dict(CLIPModel(megaclip_config({**overrides, "output_dim": 16}, 1).model), full, 1, 0)
    assert "\n" not in str(e.value)


def test_a_tp_the_model_cannot_split_to_fails_in_one_line(small_open_clip, tmp_path, capsys):
    model, model_cfg, _ = small_open_clip
    overrides, full = from_open_clip(model.state_dict(), model_cfg)
    with pytest.raises(ConfigError, match="num_attention_heads 4 is not divisible by tensor_model_parallel_size 3"):
        megaclip_config(overrides, 3)
    write_model_checkpoint(tmp_path / "ckpt", full, megaclip_config(overrides, 1), 1)
    capsys.readouterr()
    assert load_tool().main(["megaclip-reshard", "--checkpoint", str(tmp_path / "ckpt"), "--tp", "3",
                             "--out", str(tmp_path / "tp3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint: error: model.vision.num_attention_heads 4 is not divisible by "
                          "tensor_model_parallel_size 3") and err.count("\n") == 1
    assert not (tmp_path / "tp3").exists()


def test_a_truncated_shard_fails_in_one_line(small_open_clip, tmp_path, capsys):
    model, model_cfg, _ = small_open_clip
    overrides, full = from_open_clip(model.state_dict(), model_cfg)
    step = write_model_checkpoint(tmp_path / "ckpt", full, megaclip_config(overrides, 2), 2)
    shard = model_shard_path(step, 1)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint file unreadable: .*tp_01\.pt \(") as e:
        read_full_model_state(tmp_path / "ckpt")
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert load_tool().main(["megaclip-to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint: error: checkpoint file unreadable:") and err.count("\n") == 1


def _changed(config: dict, section: str, **changes) -> dict:
    config = copy.deepcopy(config)
    (config[section] if section else config).update(changes)
    return config


@pytest.mark.parametrize("model_cfg, message", [
    (_changed(SMALL_OPEN_CLIP, "vision_cfg", attentional_pool=True), "vision_cfg.attentional_pool=True is not supported"),
    (_changed(SMALL_OPEN_CLIP, "text_cfg", pool_type="last"), "text_cfg.pool_type='last' is not supported"),
    (_changed(SMALL_OPEN_CLIP, "vision_cfg", image_size=[32, 48]), r"image_size=\[32, 48\]: non-square images"),
    (_changed(SMALL_OPEN_CLIP, "vision_cfg", layers=[3, 4, 6, 3]), "ResNet image towers are not supported"),
    (_changed(SMALL_OPEN_CLIP, "text_cfg", hf_model_name="roberta-base"), "text_cfg.hf_model_name='roberta-base'"),
    (_changed(SMALL_OPEN_CLIP, "", custom_text=True), "custom_text=True is not supported"),
    (_changed(SMALL_OPEN_CLIP, "vision_cfg", rope=True), "setting vision_cfg.rope is not supported"),
])
def test_unsupported_open_clip_features_are_named(model_cfg, message):
    with pytest.raises(ValueError, match=message) as e:
        from_open_clip({}, model_cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("changes, message", [
    ({"vision_config": {**SMALL_HF["vision_config"], "hidden_act": "gelu_new"}}, "vision_config.hidden_act='gelu_new'"),
    ({"text_config": {**SMALL_HF["text_config"], "eos_token_id": 3}}, "text_config.eos_token_id=3"),
    ({"vision_config": {**SMALL_HF["vision_config"], "image_size": [32, 48]}}, r"image_size=\[32, 48\]: only square"),
])
def test_unsupported_hf_features_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        from_hf({}, {**SMALL_HF, **changes})


@pytest.mark.parametrize("changes, convert, message", [
    ({"vision": {"activation": "gelu"}}, to_open_clip, "one activation for both towers"),
    ({"text": {"tokenizer": {"library": "sentencepiece"}}}, to_open_clip, "tokenize with CLIP BPE"),
    ({"vision": {"global_average_pool": True}}, to_hf, "global_average_pool=True is not supported"),
    ({"vision": {"class_token_length": 2}}, to_hf, "one class token"),
])
def test_megaclip_features_the_targets_lack_are_named(small_open_clip, changes, convert, message):
    model, model_cfg, _ = small_open_clip
    overrides, full = from_open_clip(model.state_dict(), model_cfg)
    with pytest.raises(ValueError, match=message):
        convert(full, OmegaConf.merge(megaclip_config(overrides, 1).model, changes))


def test_catlip_exports_its_image_tower(tmp_path, capsys):
    """A model.loss=catlip checkpoint (no text tower, a class head) saved at TP=2 exports as open_clip's
    model.visual and HF's CLIPVisionModelWithProjection, each giving the image features megaclip gives,
    with one line saying that the head is left out."""
    cfg = small_config("model.loss=catlip", "model.vision.activation=quick_gelu")
    torch.manual_seed(0)
    model = jitter(CLIPModel(cfg.model, 20), 3)
    write_model_checkpoint(tmp_path / "ckpt", model.state_dict(), cfg, 2)
    tool = load_tool()
    exported = tmp_path / "open_clip" / "catlip_export.pt"
    assert tool.main(["megaclip-to-open_clip", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(exported)]) == 0
    assert tool.main(["megaclip-to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "catlip_head" in line]
    assert said == [f"a model.loss=catlip model has no text tower: exporting its image tower alone as {target}; its "
                    "classification head over 20 synsets (catlip_head) is left out"
                    for target in ("open_clip's model.visual", "HF's CLIPVisionModelWithProjection")]

    images = batch(cfg.model.vision.img_h)[0]
    open_clip.add_model_config(exported.with_suffix(".json"))
    theirs = open_clip.create_model("catlip_export")  # with a placeholder text tower
    theirs.visual.load_state_dict(torch.load(exported))  # strictly
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ours = model.encode_image(images)
        from_open_clip_model = theirs.eval().encode_image(images, normalize=True)
        from_hf_model = F.normalize(hf.eval()(pixel_values=images).image_embeds, dim=-1)
    assert_same_features([ours], [from_open_clip_model])
    assert_same_features([ours], [from_hf_model])

"""One training step of megaclip at TP=2 x DP=2 on a converted open_clip model equals one step of
open_clip's own recipe (open_clip_train): ClipLoss, AdamW with its two parameter groups, gradient
norm clipping, the logit scale clamped to ln(100); tensor by tensor, to a bound from fp32 rounding."""
import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from megaclip import distributed
from megaclip.convert import import_library, megaclip_config
from megaclip.convert.open_clip import from_open_clip, to_open_clip
from megaclip.data.clip_bpe import ClipBpeTokenizer
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel
from megaclip.model.state import load_full_state_dict
from megaclip.optim import build_optimizer
from tests.distributed import run_distributed
from tests.helpers import full_tensors

open_clip = import_library("open_clip")

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
# open_clip_train's defaults for ViT models, a larger lr so that weight decay moves weights visibly
OPTIM = {"lr": 1e-3, "weight_decay": 0.2, "betas": [0.9, 0.98], "eps": 1e-6, "grad_clip": 1.0}
CAPTIONS = ["a photo of a cat", "two dogs in the snow!??", "a red car", "wow!?! a bird", "an empty street at night",
            "a bowl of soup", "three people on a beach", "a diagram (so clear!!)."]
FP32_EPS = torch.finfo(torch.float32).eps  # 2**-23: one rounding errs by at most half of it


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random open_clip model whose every tensor is non-trivial, and a batch of 8 with CLIP BPE id 0."""
    folder = tmp_path_factory.mktemp("tiny_open_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    with torch.no_grad():
        for p in model.parameters():  # random init leaves biases at 0 and norms at 1
            p.add_(0.02 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(100) + 0.01)  # above the clamp, so the clamp must act
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = ClipBpeTokenizer(16)(CAPTIONS)
    assert (tokens[:, 1:-1] == 0).logical_and(tokens[:, 2:] != 0).any()  # id 0 inside a caption
    return model, images, tokens


def open_clip_step(model, images, tokens):
    """open_clip_train's step (train.py, optimizer groups from main.py), on one process, on a copy."""
    model = copy.deepcopy(model)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": OPTIM["weight_decay"]}],
                                  lr=OPTIM["lr"], betas=tuple(OPTIM["betas"]), eps=OPTIM["eps"])
    loss = open_clip.loss.ClipLoss()(*model(images, tokens))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in named}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"], norm_type=2.0)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item(), norm.item(), grads, {n: p.detach().clone() for n, p in named}


def megaclip_step(model_cfg, full, images, tokens):
    """megaclip's training step (as megaclip.train runs it) on this rank's rows of the batch; the
    loss, gradient norm, and the full-size DP-averaged gradients before clipping and weights after."""
    model = CLIPModel(model_cfg)
    load_full_state_dict(model, full, distributed.tp_size(), distributed.tp_rank())
    optimizer = build_optimizer(model, model_cfg, distributed.dp_group(), distributed.tp_group())
    rows = slice(distributed.dp_rank() * 4, distributed.dp_rank() * 4 + 4)
    loss = ClipLoss(model_cfg.local_loss, model_cfg.gather_with_grad, group=distributed.dp_group())(
        *model(images[rows], tokens[rows]))
    loss.backward()
    averaged = [p.grad.clone() for p in model.parameters()]
    for g in averaged:
        torch.distributed.all_reduce(g, group=distributed.dp_group())
        g /= distributed.dp_size()
    norm = optimizer.finish_gradients(model_cfg.optim.grad_clip).item()
    optimizer.step()
    model.clamp_logit_scale()
    for p, g in zip(model.parameters(), averaged):
        p.grad = g  # gathered over TP below, with the weights
    cfg = OmegaConf.create({"model": model_cfg})
    tensors = full_tensors(model, cfg)
    return (loss.item(), norm, to_open_clip({n: g for n, (_, g) in tensors.items()}, model_cfg),
            to_open_clip({n: v for n, (v, _) in tensors.items()}, model_cfg))


def adam_first_step_bound(g_a, g_b, p, lr):
    """Largest |difference| of a parameter after AdamW's first step from clipped gradients g_a, g_b.

    The first step's update is lr * u(g), u(g) = g / (|g| + eps) (m_hat = g, v_hat = g^2), whose slope
    eps / (|g| + eps)^2 is largest at the |g| nearest zero between g_a and g_b (zero if their signs
    differ); |u| < 1, so u differs by at most min(2, slope * |g_a - g_b|). g_a and g_b are clipped here
    with the returned norms; each optimizer's own clipping rounds them by at most eps * |g| more.
    Each side computes u in about ten fp32 roundings (within 8 eps) and p * (1 - lr * wd) - lr * u in
    two more (within 2 eps of |p| + lr): 16 eps * lr + 4 eps * (|p| + lr) on top. Where gradients
    are rounding noise (the key bias: zero in exact arithmetic) u is linear in g and the bound is met
    almost exactly, so nothing looser would be an argument."""
    eps = OPTIM["eps"]
    nearest = torch.where(g_a * g_b > 0, torch.minimum(g_a.abs(), g_b.abs()), torch.zeros_like(g_a))
    dg = (g_a - g_b).abs() + FP32_EPS * (g_a.abs() + g_b.abs())
    du = torch.clamp(eps / (nearest + eps) ** 2 * dg, max=2.0)
    return lr * (du + 20 * FP32_EPS) + 4 * FP32_EPS * p.abs()


@pytest.mark.parametrize("optimizer", ["fused_adam", "distributed_fused_adam"])
def test_one_step_at_tp2_dp2_equals_open_clip(source, optimizer):
    model, images, tokens = source
    overrides, full = from_open_clip(model.state_dict(), TINY_OPEN_CLIP)
    cfg = megaclip_config(overrides, 2)
    # the step reads the gradients between backward and finish_gradients, which an overlapped DP
    # reduction would be summing in place at that moment (overlap on vs off: tests/test_overlap.py)
    model_cfg = OmegaConf.merge(cfg.model, {"optim": {**OPTIM, "name": optimizer, "overlap_grad_sync": False}})
    ranks = run_distributed(megaclip_step, 4, 2, model_cfg, full, images, tokens)
    ref_loss, ref_norm, ref_grads, ref_params = open_clip_step(model, images, tokens)
    assert ref_norm > 10 * OPTIM["grad_clip"]  # clipping acts
    assert ref_params["logit_scale"] == math.log(100)  # and so does the clamp
    for loss, norm, grads, params in ranks:
        # Features agree to ~1e-6 (test_convert; other summation orders); the loss is cross-entropy over
        # logits 100 * cos, so it moves by at most 2 * 100 * 1e-6 on a loss of ~ln 8 ~ 2: rel 1e-4.
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        assert norm == pytest.approx(ref_norm, rel=1e-4)  # the norm of gradients agreeing as below
        # Gradients: sums of the same products over batch, sequence and width (up to ~1e5 of them) in
        # other orders (TP partial sums, DP halves, SDPA vs nn.MultiheadAttention): rounding errors of
        # random sign grow as sqrt(n) eps ~ 4e-5 of each tensor's norm. The weights are then held to
        # the bound that these gradient differences imply, element by element.
        clipped = {}
        for name, ref in ref_grads.items():
            assert (grads[name] - ref).norm() <= 4e-5 * ref.norm(), name
            clipped[name] = grads[name] * min(1.0, OPTIM["grad_clip"] / (norm + 1e-6))
        ref_clip = min(1.0, OPTIM["grad_clip"] / (ref_norm + 1e-6))
        for name, ref in ref_params.items():
            bound = adam_first_step_bound(clipped[name], ref_grads[name] * ref_clip, ref, OPTIM["lr"])
            assert ((params[name] - ref).abs() <= bound).all(), name

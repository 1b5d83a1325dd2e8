"""SigLIP (model.loss=siglip): the ring loss over the DP group against the sigmoid loss of the whole
global batch on one process and against open_clip's SigLipLoss; the bytes the loss keeps for backward
do not grow with DP; a whole run learns, checkpoints and resumes; logit_bias in conversion and in the
memory planner."""
import json
import math
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from megaclip import distributed, precision
from megaclip.convert import import_library, megaclip_config
from megaclip.convert.hf import to_hf
from megaclip.convert.open_clip import from_open_clip, open_clip_model_config, to_open_clip
from megaclip.memory import Layout, plan_memory
from megaclip.memory_activations import activation_bytes
from megaclip.memory_parameters import parameter_shapes
from megaclip.model import CLIPModel
from megaclip.model.state import load_full_state_dict
from megaclip.sigmoid_loss import sigmoid_loss
from tests.distributed import average_gradients, run_distributed
from tests.helpers import small_config
from tests.test_resume import ENV, ROOT, command

BATCH, DIM = 3, 8  # per DP rank
SCALE, BIAS = 10.0, -10.0  # SigLIP's initial temperature and bias
# The scale and bias are learned: test at a trained-looking point too, where positives and negatives
# both contribute (at the initial -10 every negative's sigmoid is ~e^-10).
POINTS = [(SCALE, BIAS), (4.0, -1.5)]


def features(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, DIM, generator=g), dim=-1), F.normalize(torch.randn(n, DIM, generator=g), dim=-1))


def global_loss(image, text, scale, bias):
    """The issue's formula over the whole batch: -(1/N) Σ_i Σ_j log σ(z_ij (t x_i·y_j + b))."""
    z = 2 * torch.eye(image.shape[0]) - 1
    return -F.logsigmoid(z * (scale * image @ text.T + bias)).sum() / image.shape[0]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def ring_loss_and_grads(global_batch, scale, bias):
    """Each DP rank takes its rows of the global batch: its loss, its feature gradients, and the
    DP-averaged gradients of the scale and bias (the replicated parameters)."""
    image, text = features(global_batch)
    per_rank = global_batch // distributed.dp_size()
    rows = slice(distributed.dp_rank() * per_rank, (distributed.dp_rank() + 1) * per_rank)
    x, y, t, b = leaves(image[rows], text[rows], torch.tensor(scale), torch.tensor(bias))
    loss = sigmoid_loss(x, y, t, b, distributed.dp_group())
    loss.backward()
    average_gradients([t, b], distributed.dp_group())
    return loss.item(), x.grad, y.grad, t.grad, b.grad


@pytest.mark.parametrize("scale,bias", POINTS)
@pytest.mark.parametrize("world,tp", [(4, 1), (3, 1), (4, 2)], ids=["dp4", "dp3", "tp2xdp2"])
def test_ring_equals_global_loss_on_one_process(world, tp, scale, bias):
    dp = world // tp
    x, y, t, b = leaves(*features(dp * BATCH), torch.tensor(scale), torch.tensor(bias))
    reference = global_loss(x, y, t, b)
    reference.backward()

    results = run_distributed(ring_loss_and_grads, world, tp, dp * BATCH, scale, bias)
    # fp32 (eps 1.2e-7): the ring adds the same N·B log-sigmoids per rank in other groupings, and a
    # gradient element sums N products of size <= t·|d logit| (N <= 12 here) in another order:
    # |error| <~ N·eps of the largest term, under 1e-5 of the tensor's largest gradient. A lost or
    # doubled block moves a gradient by a whole term, ~1/N of it.
    ranks_of_dp = [r for r in range(world) if r % tp == 0]  # one TP rank per DP rank (the others are alike)
    mean_loss = sum(results[r][0] for r in ranks_of_dp) / dp  # L_r differs by rank; its mean is the global loss
    assert mean_loss == pytest.approx(reference.item(), rel=1e-5)
    for rank, (_, g_image, g_text, g_scale, g_bias) in enumerate(results):
        rows = slice((rank // tp) * BATCH, (rank // tp + 1) * BATCH)
        # a rank's feature gradient is that of the sum of all ranks' losses: DP x the global one,
        # which the DP average of the parameter gradients divides back out
        for got, full in ((g_image, x.grad), (g_text, y.grad)):
            expected = dp * full[rows]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        torch.testing.assert_close(g_scale, t.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_bias, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale,bias", POINTS)
def test_one_process_equals_open_clip(scale, bias):
    open_clip = import_library("open_clip")
    ours, theirs = (leaves(*features(2 * BATCH, seed=1), torch.tensor(scale), torch.tensor(bias)) for _ in range(2))
    sigmoid_loss(*ours).backward()
    expected = open_clip.loss.SigLipLoss()(*theirs)
    expected.backward()
    # the same terms; our backward is written out, theirs is autograd's: fp32 rounding in another order
    assert sigmoid_loss(*ours).item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


def bytes_saved_for_backward(loss_fn):
    """The bytes of the tensors autograd keeps for the loss's backward (inputs included)."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    x, y, t, b = leaves(*features(8, seed=distributed.dp_rank()), torch.tensor(SCALE), torch.tensor(BIAS))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(x, y, t, b)
    loss.backward()
    return sum(saved)


def saved_bytes_of_both():
    open_clip = import_library("open_clip")
    theirs = open_clip.loss.SigLipLoss(rank=dist.get_rank(), world_size=dist.get_world_size())
    return (bytes_saved_for_backward(lambda *a: sigmoid_loss(*a, distributed.dp_group())),
            bytes_saved_for_backward(theirs))


def test_loss_memory_does_not_grow_with_dp():
    """Same local batch (8) at DP 2 and 4. open_clip's ring (autograd through every exchange, on the
    world group: TP=1 here) shows that the measure sees the growth."""
    (ours_dp2, theirs_dp2), (ours_dp4, theirs_dp4) = (run_distributed(saved_bytes_of_both, dp, 1)[0] for dp in (2, 4))
    assert ours_dp4 <= ours_dp2
    assert theirs_dp4 > theirs_dp2
    assert ours_dp4 < theirs_dp4


def test_whole_run_learns_and_resumes_at_another_layout(tmp_path):
    """A DP=2 SigLIP run with the default scalars, then the same run resumed at TP=2 (resharded)."""
    run = tmp_path / "run"
    first = ["tp=1", "model.loss=siglip", "model.optim.sched.warmup_steps=8", "exp_manager.checkpoint.every_n_steps=96"]
    proc = subprocess.run(command(tmp_path / "data", run, *first, "steps=96"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    learned = final_mean_ranks(proc.stdout)
    # SigLIP's b = -10 first pulls every pair together (the negatives' sigmoids are ~e^-10) and sits some
    # 40 steps at the prior (all logits ln(1/63), loss ln 64 + 63 ln(64/63) = 5.15) before it tells pairs
    # apart: 96 steps reach mean ranks ~55 here (~120 at 80). A random ranking of 432 pairs has mean rank
    # 216.5 (std ~6 over 432 queries).
    assert all(rank < 0.75 * 216.5 for rank in learned), proc.stdout[-1000:]
    saved = torch.load(run / "checkpoints" / "step_0000096" / "model" / "tp_00.pt")
    assert saved["logit_bias"].dtype == torch.float32 and saved["logit_bias"].item() != BIAS  # learned, saved

    resumed = subprocess.run(command(tmp_path / "data", run, "tp=2", "model.loss=siglip", "steps=97"), cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step_0000096'}" in resumed.stdout
    assert resumed.stdout.splitlines()[-1].startswith("final: step=97 ")
    shards = [torch.load(run / "checkpoints" / "step_0000097" / "model" / f"tp_{r:02d}.pt") for r in range(2)]
    assert shards[0]["logit_bias"] == shards[1]["logit_bias"]  # replicated over TP
    # one more step at the lowest learning rate keeps what was learned: the weights were loaded
    assert all(rank < 0.75 * 216.5 for rank in final_mean_ranks(resumed.stdout))


def final_mean_ranks(stdout):
    last_eval = [line for line in stdout.splitlines() if line.startswith("eval step")][-1]
    return [float(last_eval.split(f"{key}=")[1].split()[0]) for key in ("i2t_mean_rank", "t2i_mean_rank")]


def test_open_clip_logit_bias_converts_both_ways(tmp_path):
    """An open_clip CLIP with a logit bias (init_logit_bias set) is a megaclip model.loss=siglip model."""
    open_clip = import_library("open_clip")
    model_cfg = {"embed_dim": 16, "init_logit_bias": BIAS, "init_logit_scale": math.log(SCALE),
                 "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 8, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    model = open_clip.create_model(f"local-dir:{tmp_path}")
    with torch.no_grad():
        model.logit_bias.fill_(-7.25)  # a trained value, not the initial one
    overrides, full = from_open_clip(model.state_dict(), model_cfg)
    cfg = megaclip_config(overrides, 1)
    assert cfg.model.loss == "siglip" and full["logit_bias"].item() == -7.25
    ours = CLIPModel(cfg.model)
    load_full_state_dict(ours, full, 1, 0)  # every name and shape, the bias included
    assert ours.logit_bias.item() == -7.25
    back = to_open_clip(full, cfg.model)
    assert open_clip_model_config(cfg.model)["init_logit_bias"] == BIAS
    assert back.keys() == model.state_dict().keys() and back["logit_bias"].item() == -7.25
    # and a CLIP model (no bias) converts without one
    clip_cfg = OmegaConf.merge(cfg.model, {"loss": "clip"})
    assert "init_logit_bias" not in open_clip_model_config(clip_cfg)
    assert "logit_bias" not in to_open_clip({k: v for k, v in full.items() if k != "logit_bias"}, clip_cfg)


@pytest.mark.parametrize("o2", [False, True])
def test_planner_counts_the_bias(o2):
    cfg = small_config("model.loss=siglip", f"precision={'bf16' if o2 else '32'}", f"model.megatron_amp_O2={o2}")
    model = precision.prepare_model(CLIPModel(cfg.model), cfg)
    assert parameter_shapes(cfg.model, 1) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    layout = Layout.from_config(cfg)
    assert plan_memory(cfg, layout).params == sum(p.numel() * p.element_size() for p in model.parameters())
    # the loss keeps the local features only: the same at any DP size for the same local batch
    kept = [activation_bytes(cfg.model, layout.replace(dp=dp, micro_batch=8)).loss for dp in (2, 4, 64)]
    assert kept == [2 * 8 * cfg.model.output_dim * 4] * 3


def test_hugging_face_export_of_a_siglip_model_is_one_line():
    cfg = small_config("model.loss=siglip", "model.text.tokenizer.library=clip_bpe", "model.text.vocab_size=49408")
    with pytest.raises(ValueError, match="HF CLIPModel has no logit_bias: a model.loss=siglip model converts to open_clip only"):
        to_hf({}, cfg.model)

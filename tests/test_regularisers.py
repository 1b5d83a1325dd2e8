"""Patch dropout, stochastic depth and use_flash_attention: the rules they follow, the same numbers at every
TP/DP layout, with sequence parallelism and with activation checkpointing, and nothing of them in eval."""
import shutil
import subprocess

import pytest
import torch

from megaclip import distributed
from megaclip.config import ConfigError
from megaclip.config_checks import validate
from megaclip.convert import import_library
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel, attention
from megaclip.model.regularisers import DropPath, PatchDropout, kept_patch_count
from megaclip.optim import build_optimizer
from tests.distributed import run_distributed
from tests.helpers import fixed_batch, full_tensors, small_config
from tests.test_memory import activation_peak, checkpoint, least_activation_peak
from tests.test_resume import ENV, ROOT, command, losses

# 16 patches of a 32x32 image and 2 class tokens: 18 tokens, and 2 + 8 kept at rate 0.5, both splittable
# over TP 2 under sequence parallelism.
REGULARISED = ["model.vision.img_h=32", "model.vision.img_w=32", "model.vision.class_token_length=2",
               "model.vision.drop_patch_rate=0.5", "model.vision.drop_path_rate=0.5", "model.text.drop_path_rate=0.5"]
CHECKPOINTING = [f"model.{tower}.{key}={value}" for tower in ("vision", "text") for key, value in (
    ("activations_checkpoint_granularity", "full"), ("activations_checkpoint_method", "uniform"),
    ("activations_checkpoint_num_layers", 1))]
BATCH = 8  # global


@pytest.mark.parametrize("patches,rate,class_tokens,multiple,kept", [
    (16, 0.5, 1, 1, 8), (16, 0.75, 1, 1, 4), (196, 0.5, 1, 1, 98), (196, 0.75, 1, 1, 49),
    (49, 0.5, 1, 1, 24), (16, 0.99, 1, 1, 1),  # floor, and at least one patch
    (16, 0.5, 1, 2, 7), (16, 0.5, 2, 2, 8), (196, 0.75, 1, 4, 47),  # class + kept rounded down to divide by tp
])
def test_kept_patch_count(patches, rate, class_tokens, multiple, kept):
    assert kept_patch_count(patches, rate, class_tokens, multiple) == kept


def test_kept_patch_count_refuses_what_sequence_parallel_cannot_split():
    with pytest.raises(ValueError, match="no count from 1 to 1"):
        kept_patch_count(16, 0.95, 2, 2)


@pytest.mark.parametrize("overrides,message", [
    (["model.vision.drop_patch_rate=1"], "model.vision.drop_patch_rate must be in [0, 1), got 1"),
    (["model.text.drop_path_rate=-0.1"], "model.text.drop_path_rate must be in [0, 1), got -0.1"),
    (["tp=2", "model.sequence_parallel=true", *REGULARISED, "model.vision.drop_patch_rate=0.95"],
     "model.vision.drop_patch_rate 0.95 keeps 1 of 16 patches; 2 class token(s) + kept patches must divide by tp 2"),
])
def test_config_refuses_bad_rates(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(small_config(*overrides), world_size=2, data=False)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_patch_dropout_keeps_open_clips_patches():
    open_clip = import_library("open_clip")
    tokens = torch.randn(5, 1 + 49, 12)
    torch.manual_seed(3)
    ours = PatchDropout(0.75, class_tokens=1)(tokens)
    torch.manual_seed(3)
    # indexing only, no arithmetic: the same noise picks the same tokens, bit for bit
    assert torch.equal(ours, open_clip.transformer.PatchDropout(0.75)(tokens))
    assert ours.shape == (5, 1 + 12, 12)


def test_patch_dropout_per_sample_and_seed():
    tokens = torch.arange(1 + 16.0)[None, :, None].expand(6, -1, 1)  # each token holds its position
    drop = PatchDropout(0.5, class_tokens=1)
    torch.manual_seed(0)
    kept = drop(tokens)[..., 0]
    assert (kept[:, 0] == 0).all()  # the class token, always first
    assert all(len(set(row[1:].tolist())) == 8 for row in kept)  # 8 distinct patches, never the class token
    assert len({tuple(sorted(row[1:].tolist())) for row in kept}) == 6  # each sample its own choice
    torch.manual_seed(0)
    assert torch.equal(drop(tokens)[..., 0], kept)
    torch.manual_seed(1)
    assert not torch.equal(drop(tokens)[..., 0], kept)


def test_drop_path_schedule_and_scale():
    drop = DropPath(0.3, num_layers=4)
    torch.testing.assert_close(drop.layer_rates(), torch.tensor([0.0, 0.1, 0.2, 0.3]))  # timm's linspace rule
    torch.manual_seed(0)
    n = 20000
    scales = drop.scales(n, torch.device("cpu"))
    assert scales.shape == (4, 2, n, 1, 1)
    for layer, rate in enumerate(drop.layer_rates().tolist()):
        values = scales[layer].flatten()
        dropped = (values == 0).float().mean().item()
        kept = values[values != 0]  # scaled by 1 / (1 - rate), in fp32
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - rate)), msg=f"layer {layer}")
        # binomial: the dropped share's standard deviation is sqrt(p (1 - p) / 2n) <= 0.0025; 5 sigma
        assert dropped == pytest.approx(rate, abs=0.0125)
    assert DropPath(0.0, 4).scales(n, torch.device("cpu")) is None  # rate 0 draws nothing


def test_eval_ignores_regularisers():
    outputs = []
    for overrides in (REGULARISED, [o for o in REGULARISED if "drop_" not in o]):
        torch.manual_seed(7)
        cfg = small_config(*overrides)
        model = CLIPModel(cfg.model).eval()
        images, tokens = fixed_batch(cfg, 4)
        rng = torch.get_rng_state()
        with torch.no_grad():
            outputs.append(model(images, tokens))
        assert torch.equal(torch.get_rng_state(), rng)  # eval draws nothing
    for with_rates, without in zip(*outputs):  # the same operations on the same inputs
        assert torch.equal(with_rates, without)


def test_flash_attention_key_falls_back_to_sdpa_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(attention, "_said", set())
    cfg = small_config(*[f"model.{tower}.use_flash_attention=true" for tower in ("vision", "text")])
    plain = small_config()
    outputs = []
    for config in (cfg, plain):
        torch.manual_seed(7)
        model = CLIPModel(config.model)
        images, tokens = fixed_batch(config, 4)
        outputs.append(model(images, tokens))
        model(images, tokens)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["use_flash_attention: flash-attn is not installed; using torch SDPA (its flash_attention kernel here)"]
    for flash_requested, sdpa in zip(*outputs):  # SDPA in both: the same call on the same inputs
        assert torch.equal(flash_requested, sdpa)
    monkeypatch.setattr(attention, "flash_attn_func", lambda *args, **kwargs: None)  # installed, but on CPU
    assert attention.flash_attention_unavailable(torch.zeros(1)) == "flash-attn runs on CUDA only, not on cpu"


def regularised_step(overrides):
    """Loss, full-size gradients (DP-averaged, sequence-parallel sums done) and the RNG state after one
    training-mode step on this rank's rows of a fixed global batch."""
    cfg = small_config(f"tp={distributed.tp_size()}", *REGULARISED, *overrides)
    distributed.seed_everything(7)
    model = CLIPModel(cfg.model)
    images, tokens = fixed_batch(cfg, BATCH)
    local = BATCH // distributed.dp_size()
    rows = slice(distributed.dp_rank() * local, (distributed.dp_rank() + 1) * local)
    loss = ClipLoss(group=distributed.dp_group())(*model(images[rows], tokens[rows]))
    loss.backward()
    build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group()).finish_gradients(0.0)
    grads = {name: grad for name, (_, grad) in full_tensors(model, cfg).items()}
    return loss.item(), grads, torch.get_rng_state()


@pytest.fixture(scope="module")
def one_process():
    return run_distributed(regularised_step, 1, 1, [])[0]


@pytest.mark.parametrize("world,tp,overrides,rtol", [
    # TP and DP sum the same fp32 products in other orders (row linears add partial sums over ranks, the
    # DP average adds per-rank gradients): a gradient element sums up to ~1e4 products, and reordering
    # moves it by ~sqrt(n) eps ~ 1e-5 of the tensor's largest gradient (as in test_tensor_parallel).
    (2, 2, [], 1e-5), (2, 1, [], 1e-5), (2, 2, ["model.sequence_parallel=true"], 1e-5),
    # Recomputation runs the same kernels on the same inputs and the same drop-path factors; only the
    # order autograd adds a residual's two gradient contributions may change: 8 eps (as in test_scale).
    (1, 1, CHECKPOINTING, 1e-6),
    (2, 2, CHECKPOINTING + ["model.sequence_parallel=true"], 1e-5),
], ids=["tp2", "dp2", "tp2-sequence-parallel", "checkpointing", "tp2-sequence-parallel-checkpointing"])
def test_same_numbers_as_one_process(one_process, world, tp, overrides, rtol):
    ref_loss, ref_grads, ref_rng = one_process
    for loss, grads, rng in run_distributed(regularised_step, world, tp, overrides):
        # A rank that dropped other patches or branches than one process would be off by O(1), not rtol.
        assert loss == pytest.approx(ref_loss, rel=rtol)
        for name, grad in grads.items():
            ref = ref_grads[name]
            torch.testing.assert_close(grad, ref, rtol=rtol, atol=rtol * ref.abs().max().item(), msg=name)
        # every rank drew exactly what one process draws (so TP ranks stay in step with each other)
        assert torch.equal(rng, ref_rng)


def test_rates_change_the_step(one_process):
    """The layouts above agree because the regularisers act the same everywhere, not because they are off."""
    loss, _, rng = run_distributed(regularised_step, 1, 1, [o.replace("0.5", "0") for o in REGULARISED
                                                            if "drop_" in o])[0]
    assert loss != pytest.approx(one_process[0], rel=1e-3)
    assert not torch.equal(rng, one_process[2])


@pytest.mark.parametrize("pooling", [["model.vision.global_average_pool=false"],
                                     ["model.vision.global_average_pool=true", "model.vision.class_token_length=0"]],
                         ids=["class-token", "average"])
def test_both_poolings_with_patch_dropout(pooling):
    cfg = small_config(*REGULARISED, *pooling)
    torch.manual_seed(7)
    model = CLIPModel(cfg.model)
    images = fixed_batch(cfg, 4)[0]
    torch.manual_seed(0)
    first = model.encode_image(images)
    torch.manual_seed(0)
    assert torch.equal(model.encode_image(images), first)  # the same draw, the same operations
    assert first.isfinite().all() and not torch.allclose(first, model.eval().encode_image(images))


def test_resume_continues_the_same_draws(tmp_path):
    """A run resumed from its step-4 checkpoint logs the uninterrupted run's losses bit for bit: the
    generator's state travels in the checkpoint, so the resumed steps drop the same patches and branches."""
    overrides = ["tp=1", "gbs=16", "steps=8", "exp_manager.checkpoint.every_n_steps=4", *REGULARISED,
                 "model.data.synthetic_train_samples=256", "model.data.zeroshot.synthetic=null"]  # tiny and quick
    whole = tmp_path / "whole"
    subprocess.run(command(tmp_path / "data", whole, *overrides, nproc=1), cwd=ROOT, env=ENV, check=True, capture_output=True)
    reference = losses(whole)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000008")
    (resumed / "checkpoints" / "latest").write_text("step_0000004\n")
    (resumed / "steps.jsonl").write_text("")
    proc = subprocess.run(command(tmp_path / "data", resumed, *overrides, nproc=1), cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the same layout runs the same kernels on bitwise the same state and batches (as in test_resume)
    assert losses(resumed) == {step: loss for step, loss in reference.items() if step > 4}


@pytest.mark.parametrize("overrides", [["model.vision.drop_patch_rate=0.5"],
                                       ["model.vision.drop_patch_rate=0.75"] + checkpoint("vision", "uniform", 2)],
                         ids=["rate-0.5", "rate-0.75-checkpointed"])
def test_planner_counts_the_kept_patches(overrides):
    measured, planned = activation_peak(overrides)
    # as tests/test_memory.py argues for the planner's activation terms: fp32, all but a few small tensors
    assert planned == pytest.approx(measured, rel=3e-3)
    assert planned < activation_peak([])[1]  # fewer tokens


def test_planner_counts_the_kept_patches_under_sequence_parallelism():
    overrides = ["model.vision.drop_patch_rate=0.5", "model.sequence_parallel=true"]
    for measured, planned in run_distributed(least_activation_peak, 2, 2, overrides):
        assert planned == pytest.approx(measured, rel=3e-3)

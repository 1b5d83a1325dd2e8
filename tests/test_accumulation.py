"""Gradient accumulation: k micro-batches give the very gradient, loss and update of one step over the whole
batch at the same layout (CLIP's global and local loss, SigLIP, CatLIP, the tiled losses, fusion; patch
dropout and drop path on), and with tower dropout on, the gradient of the loss computed from the masks pass 1 drew (the
replay)."""
import json
import shutil
import subprocess

import pytest
import torch

from megaclip import accumulation, distributed, fusion_objective, precision
from megaclip.config import load_config
from megaclip.memory import GiB, Layout, least_recompute_fit
from megaclip.memory_activations import activation_bytes
from megaclip.model import CLIPModel
from megaclip.model.regularisers import draw_step_seed, drawn_for_step
from megaclip.objectives import build_objective
from megaclip.optim import build_optimizer
from tests.distributed import run_distributed
from tests.helpers import fixed_batch, full_tensors, small_config
from tests.test_fusion import FUSION
from tests.test_memory import MEDIUM, LiveBytes
from tests.test_resume import ENV, ROOT, command, losses
from tests.test_tiled_loss import one_thread  # noqa: F401 (a fixture)
from tests.test_tools import load_tool

BATCH = 16  # global: 8 per rank at DP 2, so 2 and 4 micro-batches of 4 and 2
REGULARISED = ["model.vision.img_h=32", "model.vision.img_w=32", "model.vision.class_token_length=2",
               "model.vision.drop_patch_rate=0.5", "model.vision.drop_path_rate=0.5", "model.text.drop_path_rate=0.5"]
DROPOUT = [f"model.{tower}.{key}=0.2" for tower in ("vision", "text") for key in ("hidden_dropout", "attention_dropout")]
OBJECTIVES = {"clip-global": [], "clip-local": ["model.local_loss=true"], "siglip": ["model.loss=siglip"],
              "catlip": ["model.loss=catlip"]}
MORE_OBJECTIVES = {  # at DP 2 only (the tiled loss at DP 3 and fusion at TP 2 are tested in their own files)
    # the tiled loss (blocks of 3 do not divide the batch) over the rank's whole batch of features
    "clip-local-tiled": ["model.local_loss=true", "model.loss_block_size=3"],
    "siglip-tiled": ["model.loss=siglip", "model.loss_block_size=3"],
    # contrastive + ITM on hard negatives + captioning, its layers' drop path drawn in the loss
    "fusion": FUSION}
CLASSES = 8  # CatLIP's head, without a vocabulary


def build(name, *overrides):
    cfg = small_config(f"tp={distributed.tp_size()}", *REGULARISED, *{**OBJECTIVES, **MORE_OBJECTIVES}[name], *overrides)
    distributed.seed_everything(3)
    model = CLIPModel(cfg.model, CLASSES if name == "catlip" else None)
    return cfg, model, build_objective(cfg.model, distributed.dp_group())


def rank_batch(cfg, name, step):
    images, tokens = fixed_batch(cfg, BATCH, seed=step)
    if name == "catlip":
        tokens = (torch.rand(BATCH, CLASSES, generator=torch.Generator().manual_seed(step)) < 0.3).float()
    per_rank = BATCH // distributed.dp_size()
    rows = slice(distributed.dp_rank() * per_rank, (distributed.dp_rank() + 1) * per_rank)
    return images[rows], tokens[rows]


def two_steps(name, micro_batches):
    """Per optimizer step: the loss and the full-size gradients after the DP average and clipping; then the
    parameters after both updates."""
    # mbs as the loop would set it: the fusion objective runs its terms a micro-batch of rows at a time
    cfg, model, objective = build(name, "model.optim.grad_clip=0.05", f"mbs={BATCH // distributed.dp_size() // micro_batches}")
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    steps = []
    for step in range(2):
        loss, terms = accumulation.step(objective, model, *rank_batch(cfg, name, step), micro_batches, torch.device("cpu"),
                                        optimizer)
        norm = optimizer.finish_gradients(cfg.model.optim.grad_clip)
        # copies: the optimizer zeroes its gradient buffers in place, and .grad are views into them
        steps.append((loss.item(), norm.item(), {n: g.clone() for n, (_, g) in full_tensors(model, cfg).items()}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
    return steps, {n: v.clone() for n, (v, _) in full_tensors(model, cfg).items()}


def every_split(names):
    return {(name, k): two_steps(name, k) for name in names for k in (1, 2, 4)}


@pytest.fixture(scope="module", params=[(2, 1), (4, 2)], ids=["dp2", "tp2xdp2"])
def splits(request):
    return run_distributed(every_split, *request.param, list(OBJECTIVES))


@pytest.fixture(scope="module")
def more_splits():
    return run_distributed(every_split, 2, 1, list(MORE_OBJECTIVES))


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("k", [2, 4])
def test_micro_batches_equal_the_whole_batch(splits, name, k):
    assert_equal_steps(splits, name, k)


@pytest.mark.parametrize("name", MORE_OBJECTIVES)
@pytest.mark.parametrize("k", [2, 4])
def test_tiled_and_fusion_micro_batches_equal_the_whole_batch(more_splits, name, k):
    assert_equal_steps(more_splits, name, k)


def assert_equal_steps(splits, name, k):
    for rank in splits:
        (whole_steps, whole_params), (steps, params) = rank[(name, 1)], rank[(name, k)]
        for (ref_loss, ref_norm, ref_grads), (loss, norm, grads) in zip(whole_steps, steps):
            # fp32 (eps 1.2e-7): the micro-batches' forwards and backwards sum the same products in other
            # orders (smaller matmuls, gradients added micro-batch by micro-batch); a gradient element sums
            # up to ~1e4 of them, and reordering moves it by ~sqrt(n) eps ~ 1e-5 of the tensor's largest
            # gradient (as in test_loss); the loss and the norm follow. A logit scale counted k times, a
            # micro-batch lost or counted twice, a mask of other patches are off by O(1).
            assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)
            assert ref_grads.keys() == grads.keys()
            for n, ref in ref_grads.items():
                torch.testing.assert_close(grads[n], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=n)
        # Two warm-up updates (lr 1e-4, 2e-4) of Adam, whose eps (1e-6) is far above the rounding of the
        # gradients compared above: an update moves by ~1e-5 of itself, a few 1e-9; 1e-6 is 1 % of an update.
        for n, ref in whole_params.items():
            torch.testing.assert_close(params[n], ref, rtol=1e-5, atol=1e-6, msg=n)
    if name != "catlip":  # the scalars' gradients come from the loss over the whole batch, once
        assert splits[0][(name, k)][0][0][2]["logit_scale"].abs().item() > 1e-4


def o2_gradients(name, micro_batches):
    """bf16 O2: the loss, the norm and the fp32 gradient buffers (reduced over DP, not clipped) of one step."""
    cfg, model, objective = build(name, "precision=bf16", "model.megatron_amp_O2=true",
                                  f"mbs={BATCH // distributed.dp_size() // micro_batches}")
    model = precision.prepare_model(model, cfg)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    with precision.autocast(cfg, torch.device("cpu")):
        loss, _ = accumulation.step(objective, model, *rank_batch(cfg, name, 0), micro_batches, torch.device("cpu"), optimizer)
    norm = optimizer.finish_gradients(0.0)
    return loss.item(), norm.item(), {n: p.main_grad.clone() for n, p in model.named_parameters()}


def o2_splits(names):
    return {(name, k): o2_gradients(name, k) for name in names for k in (1, 2)}


def test_micro_batches_under_bf16_o2_give_the_whole_batch_gradient():
    names = ["clip-global", "siglip", "fusion"]
    for rank in run_distributed(o2_splits, 2, 1, names):
        for name in names:
            (ref_loss, ref_norm, ref), (loss, norm, grads) = rank[(name, 1)], rank[(name, 2)]
            # bf16 towers (eps 2^-8): a micro-batch's bf16 weight gradient is rounded to 8 bits before it is
            # added to the fp32 buffer, the whole batch's once, and bf16 matmuls over fewer rows may round
            # activations differently by an ulp; the whole gradient then moves by a few eps of its norm
            # (3e-3 measured), hence 2^-5. A tensor whose gradient is a sum of many cancelling terms (the
            # fusion layers' LayerNorms, run a micro-batch of rows at a time: their gradient's norm is a
            # small part of its terms') keeps fewer digits: up to 1e-1 measured, hence 2^-1 per tensor.
            # Other CPUs (AVX2, AVX-512, with or without native bf16 dot products) pick other matmul
            # blockings, so other ulps flip, but each flip is still one bf16 rounding: the sizes above are
            # set by bf16's eps and the cancellation, not by this machine, and the bounds leave 10x (whole)
            # and 5x (per tensor) over what was measured.
            # The whole-gradient bound is the guard against what the test is for: the logit scale counted
            # twice (100 %), a micro-batch lost or counted twice (~50 % of the whole gradient at k = 2); the
            # per-tensor bound catches a tensor's gradient lost or doubled (100 %). The fp32 tests above
            # check every tensor to 1e-5. The loss and the scalars' gradients are
            # computed in fp32 from bf16 features that pass 1 and pass 3 compute alike: 2^-8.
            assert loss == pytest.approx(ref_loss, rel=2 ** -8) and norm == pytest.approx(ref_norm, rel=2 ** -5)
            difference = torch.stack([(grads[n] - g).norm() for n, g in ref.items()]).norm()
            assert difference <= 2 ** -5 * torch.stack([g.norm() for g in ref.values()]).norm(), name
            for n, g in ref.items():
                assert (grads[n] - g).norm() <= 2 ** -1 * g.norm(), (name, n)
            assert grads["logit_scale"].item() == pytest.approx(ref["logit_scale"].item(), rel=2 ** -8)


def gradients_with_dropout(name, micro_batches, replay=True):
    """One step with tower dropout on: the gradients of GradCache's accumulation, and the reference: the
    loss of the features of the same micro-batch forwards, the same draws, through autograd. The fusion
    layers (the text tower's dropout) run the loss's rows a micro-batch at a time, each chunk recomputed
    in backward; the reference runs the same chunks without the recomputation (its backward uses the
    masks its forward drew), so the chunks' replay is checked too."""
    cfg, model, objective = build(name, *DROPOUT, f"mbs={BATCH // distributed.dp_size() // micro_batches}")
    images, tokens = rank_batch(cfg, name, 0)
    rng, replay_state = torch.get_rng_state(), accumulation._set_rng_state
    if not replay:  # what open_clip does: pass 3 draws new dropout masks
        accumulation._set_rng_state = lambda state, device: None
    try:
        loss, _ = accumulation.step(objective, model, images, tokens, micro_batches, torch.device("cpu"))
    finally:
        accumulation._set_rng_state = replay_state
    accumulated = {n: g.clone() for n, (_, g) in full_tensors(model, cfg).items()}
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    seed, features = draw_step_seed(), []
    for i, part in enumerate(zip(images.chunk(micro_batches), tokens.chunk(micro_batches))):
        with drawn_for_step(seed, i, micro_batches):
            features.append(objective.features(model, *part))
    recompute, fusion_objective.checkpoint = fusion_objective.checkpoint, lambda fn, *args, **_: fn(*args)
    try:
        with drawn_for_step(seed + accumulation.LOSS_STREAM):  # the fusion negatives' draws, as accumulation's
            ref_loss, _ = objective.loss(model, tuple(torch.cat(f) for f in zip(*features)))
    finally:
        fusion_objective.checkpoint = recompute
    ref_loss.backward()
    return loss.item(), ref_loss.item(), accumulated, {n: g for n, (_, g) in full_tensors(model, cfg).items()}


def dropout_cases():
    return {(name, k, replay): gradients_with_dropout(name, k, replay)
            for name in ("clip-global", "siglip", "fusion") for k in (2, 4) for replay in (True, False)}


@pytest.fixture(scope="module")
def dropout():
    return run_distributed(dropout_cases, 4, 2)


@pytest.mark.parametrize("name", ["clip-global", "siglip", "fusion"])
@pytest.mark.parametrize("k", [2, 4])
def test_dropout_is_replayed(dropout, name, k):
    """Attention and hidden dropout draw masks of the micro-batch's shape, so no split can draw the whole
    batch's; what accumulation promises with them is the exact gradient of the loss it reports."""
    for rank in dropout:
        loss, ref_loss, grads, ref_grads = rank[(name, k, True)]
        # the same kernels on the same inputs, the micro-batches' parameter gradients summed in another
        # order (in the one backward of the reference, one by one in accumulation): as above
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for n, ref in ref_grads.items():
            torch.testing.assert_close(grads[n], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=n)
        # without the replay pass 3 computes other features than pass 1: the gradients are off by O(1)
        loss, ref_loss, grads, ref_grads = rank[(name, k, False)]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        off = max((grads[n] - ref).abs().max().item() / ref.abs().max().item() for n, ref in ref_grads.items()
                  if ref.abs().max() > 0)
        assert off > 1e-2


def test_main_job_with_a_quarter_micro_batch_learns_like_the_whole_batch(tmp_path):
    """The README's main job (TP 2 on 2 processes: DP 1, 64 samples a rank) with micro_batch_size 16, i.e.
    4 micro-batches per optimizer step, patch dropout on; then its step-8 checkpoint resumed without
    accumulation (a checkpoint lies between optimizer steps, so micro_batch_size may change) runs steps
    9 to 16 again over the whole batch at once."""
    overrides = ["tp=2", "steps=16", "lr=1e-3", "model.optim.sched.warmup_steps=4", "model.data.synthetic_train_samples=512",
                 "model.vision.drop_patch_rate=0.5", "model.data.zeroshot.synthetic=null",  # learns within 16 steps
                 "exp_manager.checkpoint.every_n_steps=8"]
    micro, whole = tmp_path / "micro", tmp_path / "whole"
    proc = subprocess.run(command(tmp_path / "data", micro, *overrides, "mbs=16"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("final: step=16 ")
    accumulated = losses(micro)
    assert sorted(accumulated) == list(range(1, 17)) and accumulated[16] < accumulated[1] - 0.5  # learns: 4.43 to 3.66
    meta = json.loads((micro / "checkpoints" / "step_0000016" / "meta.json").read_text())
    assert meta["consumed_samples"] == 16 * 64  # samples per optimizer step, whatever the micro-batches

    shutil.copytree(micro, whole)
    shutil.rmtree(whole / "checkpoints" / "step_0000016")
    (whole / "checkpoints" / "latest").write_text("step_0000008\n")
    (whole / "steps.jsonl").write_text("")
    proc = subprocess.run(command(tmp_path / "data", whole, *overrides), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith("final: step=16 ")
    reference = losses(whole)
    assert sorted(reference) == list(range(9, 17))
    for step, loss in reference.items():
        # Each step's gradients agree to fp32 reordering (~1e-5 of the largest, as above), which Adam's
        # eps (1e-6) keeps from turning into different updates; over 16 steps from the start the losses
        # of the two ways stayed within 2.3e-7 of each other (measured). 1e-5 is far below what a lost
        # or doubled micro-batch, or other patches dropped, does to a step's loss (~1e-2).
        assert accumulated[step] == pytest.approx(loss, rel=1e-5), step


def accumulation_peak(overrides, batch, micro_batches):
    """(live activation peak of one accumulated step on one process, the planner's); gradients allocated
    up front as the flat buffers are; the micro-batches' inputs counted as the device copies they are
    on a GPU (here they are views of the host batch)."""
    cfg = small_config(*overrides)
    model = CLIPModel(cfg.model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    images, tokens = fixed_batch(cfg, batch)
    live = LiveBytes([t for p in model.parameters() for t in (p, p.grad)] + [images, tokens])
    with live:
        accumulation.step(build_objective(cfg.model, None), model, images, tokens, micro_batches, torch.device("cpu"))
    micro, v = batch // micro_batches, cfg.model.vision
    inputs = micro * (v.num_channels * v.img_h * v.img_w * 4 + 8 * cfg.model.text.encoder_seq_length)
    layout = Layout.from_config(cfg).replace(micro_batch=micro, micro_batches=micro_batches)
    return live.peak + inputs, activation_bytes(cfg.model, layout).peak


@pytest.mark.parametrize("overrides,batch,micro_batches", [
    (MEDIUM, 64, 4),  # the towers' pass is the peak
    ([], 1024, 16), (["model.local_loss=true"], 1024, 16), (["model.loss_block_size=64"], 1024, 16),
    (["model.loss=siglip"], 1024, 16),  # the loss over the rank's 1024 cached features is the peak
], ids=["towers", "loss", "local-loss", "tiled-loss", "siglip"])
def test_planner_counts_the_accumulated_step(overrides, batch, micro_batches, one_thread):
    live, planned = accumulation_peak(overrides, batch, micro_batches)
    # The planner's formulas are matched to live tensors (megaclip.memory_activations); the loss's temporaries are
    # counted by shape, not freed op by op: measured within 1.2 %.
    assert planned == pytest.approx(live, rel=0.02)


def test_fusion_terms_run_a_micro_batch_at_a_time(one_thread):
    # 64 samples in 8 micro-batches. Without chunks the loss pass holds the fusion activations of 3 · 64
    # ITM pairs and 64 captions at once; in chunks of the micro-batch, those of 8 rows beside the cached
    # features: measured 0.87 MiB against 10.2, and the planner (which counts chunks whenever there are
    # micro-batches) 0.75. Its fusion terms are estimated by shape, not matched to live tensors as the
    # towers' are (the attention's temporaries): within 25 %. Both figures are bytes of tensors, fixed by
    # the shapes and the order of the ops, not by the CPU's vector width.
    chunked, planned = accumulation_peak([*FUSION, "mbs=8"], 64, 8)
    whole, _ = accumulation_peak(FUSION, 64, 8)  # no micro_batch_size in the config: all rows at once
    assert chunked < 0.25 * whole
    assert planned == pytest.approx(chunked, rel=0.25)


def test_fit_proposes_accumulation_when_nothing_else_fits(capsys):
    """L/14 at its global batch of 32 768 on one 80 GB GPU: no checkpointing fits the whole batch at once;
    --fit proposes micro-batches, the fewest that fit without recomputation."""
    tool = load_tool("plan_memory")
    args = ["--config-name", "clip_L14", "--precision", "bf16", "--o2", "--optimizer", "distributed_fused_adam"]
    tool.main(["--fit", "--gpus-per-node", "1", *args])
    tp, dp, micro, micro_batches = map(int, capsys.readouterr().out.splitlines()[-1].split()[:4])
    assert (tp, dp, micro * micro_batches) == (1, 1, 32768) and micro_batches > 1
    cfg, budget = load_config("clip_L14"), int(72 * GiB)
    whole = Layout.from_config(cfg, 1).replace(precision="bf16", o2=True, optimizer="distributed_fused_adam")
    assert not least_recompute_fit(cfg, whole, budget).fits
    chosen = whole.replace(micro_batch=micro, micro_batches=micro_batches)
    assert least_recompute_fit(cfg, chosen, budget).recomputed == 0
    fewer = whole.replace(micro_batch=2 * micro, micro_batches=micro_batches // 2)
    assert least_recompute_fit(cfg, fewer, budget).recomputed > 0 or not least_recompute_fit(cfg, fewer, budget).fits

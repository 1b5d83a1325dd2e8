"""CatLIP (model.loss=catlip): the BCE on class-sharded logits against torch's BCE on the whole
logits of the whole batch on one process (TP 1/2/4, DP 2, TP2xDP2)."""
import subprocess

import numpy
import pytest
import torch
import torch.nn.functional as F

from megaclip import distributed, precision
from megaclip.catlip_loss import catlip_loss
from megaclip.checkpoint.model import load_model_for_inference
from megaclip.config import ConfigError
from megaclip.config_checks import validate
from megaclip.data.samples import DataError
from megaclip.data.synset_vocab import run_vocabulary
from megaclip.data.synthetic import SHAPES, render
from megaclip.memory import Layout, layout_problem, plan_memory
from megaclip.memory_parameters import parameter_shapes
from megaclip.model import CLIPModel
from megaclip.optim import build_optimizer
from tests.distributed import average_gradients, run_distributed
from tests.helpers import fixed_batch, small_config
from tests.test_memory import MEDIUM, LiveBytes, optimizer_state_bytes, tensor_bytes
from tests.test_resume import ENV, ROOT, command, losses
from tests.test_tools import load_tool

CLASSES, DIM = 8, 5


def problem(batch, seed=0):
    """Features, a head weight and multi-hot targets (about a third of the classes on)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, DIM, generator=g)
    weight = torch.randn(CLASSES, DIM, generator=g)
    targets = (torch.rand(batch, CLASSES, generator=g) < 0.33).float()
    return features, weight, targets


def reference(batch):
    features, weight, targets = problem(batch)
    weight.requires_grad_()
    loss = F.binary_cross_entropy_with_logits(features @ weight.T, targets, reduction="sum") / batch
    loss.backward()
    return loss.item(), weight.grad


def sharded(global_batch):
    """This rank's rows of the batch and classes of the head, the loss, and the head's gradient
    DP-averaged as the optimizer does, gathered over TP."""
    features, weight, targets = problem(global_batch)
    tp, dp = distributed.tp_size(), distributed.dp_size()
    local_weight = weight.chunk(tp)[distributed.tp_rank()].clone().requires_grad_()
    rows = slice(distributed.dp_rank() * global_batch // dp, (distributed.dp_rank() + 1) * global_batch // dp)
    loss = catlip_loss(features[rows] @ local_weight.T, targets[rows], distributed.tp_group(), distributed.dp_group())
    loss.backward()
    average_gradients([local_weight], distributed.dp_group())
    parts = [torch.empty_like(local_weight.grad) for _ in range(tp)]
    torch.distributed.all_gather(parts, local_weight.grad, group=distributed.tp_group())
    return loss.item(), torch.cat(parts)


# fp32: the sharded loss adds the same B x C terms in another order (per-rank partial sums, then the
# all-reduce), so it differs from the reference by a few ulps of the sum: relative 1e-5 leaves a
# hundredfold margin over B*C*eps for these 6 x 8 terms of size ~1. Gradients are per-element
# products with no summation across shards (DP: the mean of two local means), so the same holds.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 2), (4, 4), (2, 1), (4, 2)], ids=["tp1", "tp2", "tp4", "dp2", "tp2xdp2"])
def test_sharded_bce_equals_the_whole_loss(world, tp):
    batch = 6
    expected_loss, expected_grad = reference(batch)
    for loss, grad in run_distributed(sharded, world, tp, batch):
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        torch.testing.assert_close(grad, expected_grad, **TOL)


def test_real_data_needs_a_vocabulary():
    cfg = small_config("model.loss=catlip", "model.data.train_shards=/data/train-{0..9}.tar", "model.vision.encoder_seq_length=null")
    with pytest.raises(ConfigError, match="model.catlip.vocabulary is not set") as e:
        validate(cfg, 1, data=False)
    assert "\n" not in str(e.value)


def test_classes_must_divide_by_tp(tmp_path):
    vocabulary = tmp_path / "synsets.tsv"
    vocabulary.write_text("synset\tname\tcount\nn1\ta.n.01\t3\nn2\tb.n.01\t2\nn3\tc.n.01\t1\n")
    with pytest.raises(DataError, match="has 3 classes, not divisible by tensor_model_parallel_size 2"):
        run_vocabulary(small_config("model.loss=catlip", f"model.catlip.vocabulary={vocabulary}", "tp=2").model, None)
    assert len(run_vocabulary(small_config("model.loss=catlip", f"model.catlip.vocabulary={vocabulary}", "tp=3").model, None)) == 3


def colour_folder(root):
    """An image folder of synthetic shapes by colour, and its class file; "unicorn" (a WordNet noun that
    no synthetic caption names) holds white shapes."""
    rng = numpy.random.default_rng(0)
    for name, colour in (("blue", "blue"), ("green", "green"), ("red", "red"), ("unicorn", "white")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            render(colour, SHAPES[i], 2 * i, 32, rng).save(root / name / f"{i}.png")
    (root / "classes.txt").write_text("blue\ngreen\nred\nunicorn\n")
    return ["model.data.zeroshot.folder=" + str(root), f"model.data.zeroshot.classes={root / 'classes.txt'}"]


def test_whole_run_learns_and_resumes(tmp_path, capsys):
    """model.loss=catlip at TP=2 on the synthetic set (its 20 classes counted from its captions, no
    vocabulary file): the loss falls well below what captions alone allow; the head names the colour
    of the val images and of a labelled folder's, a linear probe on the image features names it too;
    the run resumes."""
    run, data = tmp_path / "run", tmp_path / "data"
    keys = ["tp=2", "model.loss=catlip", "model.optim.sched.warmup_steps=8", "exp_manager.checkpoint.every_n_steps=64",
            *colour_folder(tmp_path / "folder")]
    proc = subprocess.run(command(data, run, *keys, "steps=64"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the folder's classes: one warning line for the class the head cannot score; its images count as errors
    warnings = [line for line in proc.stderr.splitlines() if "zero-shot classes" in line]
    assert warnings == ["megaclip: warning: 1 of 4 zero-shot classes name no synset in the CatLIP vocabulary "
                        "and are never predicted: unicorn"], proc.stderr[-2000:]
    assert 0 <= metric(proc.stdout, "zeroshot_classes_top1") <= 0.75
    # the probe: fitted on about half of the 432 val images' embeddings, scored on the rest (chance 1/8)
    assert metric(proc.stdout, "probe_synthetic_colour_top1") > 3 / 8, proc.stdout[-1000:]
    curve = losses(run)
    # Each caption names 3-4 of the 20 classes. The best prediction that ignores the image, each class's
    # frequency, scores the base rates' entropy: 8.65 nats on these 2048 captions (the start, all logits
    # ~0, is 20 ln 2 = 13.9). Only what the image shows brings it lower: 64 steps reach ~7.3 here, and
    # the head names the colour of ~60 % of the val images (chance 1/8).
    late = sum(curve[s] for s in range(57, 65)) / 8
    assert late < 8.0, curve
    assert top1(proc.stdout) > 3 / 8, proc.stdout[-1000:]
    saved = [torch.load(run / "checkpoints" / "step_0000064" / "model" / f"tp_{r:02d}.pt") for r in range(2)]
    assert saved[0]["catlip_head.weight"].shape == (10, 64) and not any(k.startswith("text.") for k in saved[0])
    resumed = subprocess.run(command(data, run, *keys, "steps=65"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step_0000064'}" in resumed.stdout
    assert resumed.stdout.splitlines()[-1].startswith("final: step=65 loss=")
    assert top1(resumed.stdout) > 3 / 8  # the weights were loaded
    model, cfg = load_model_for_inference(run / "checkpoints" / "step_0000065")  # TP=2 shards joined
    size = cfg.model.vision.img_h
    assert model.text is None and model.classify(torch.zeros(1, 3, size, size)).shape == (1, 20)
    evaluate_tool, checkpoint = load_tool("evaluate").main, str(run / "checkpoints" / "step_0000065")
    capsys.readouterr()
    # the tool classifies from the head, as the run's own evaluation does: the same top-1 on the same split
    assert evaluate_tool(["--checkpoint", checkpoint, "--synthetic-zeroshot", "colour"]) == 0
    tool_top1 = float(capsys.readouterr().out.split("top1=")[1].split()[0])
    # same images and weights, but TP=2 logits summed in another order than one process: an image whose two
    # best logits are within rounding may flip; a few of the split, not more
    assert tool_top1 == pytest.approx(top1(resumed.stdout), abs=0.01)
    assert evaluate_tool(["--checkpoint", checkpoint]) == 2  # nothing to retrieve with: one line says what to pass
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is a model.loss=catlip model: it classifies from its head" in err[0], err


def metric(stdout, name):
    return float(stdout.splitlines()[-1].split(f"{name}=")[1].split()[0])


def top1(stdout):
    return metric(stdout, "zeroshot_synthetic_colour_top1")


# ---------------------------------------------------------------- the memory planner

PLANNER_CLASSES = 100_000  # enough that the loss and the head's gradients weigh in the activation peak


def write_vocabulary(path, classes):
    path.write_text("synset\tname\tcount\n" + "".join(f"n{i:08d}\tc{i}.n.01\t1\n" for i in range(classes)))
    return f"model.catlip.vocabulary={path}"


def catlip_parameters_and_bytes(vocabulary, overrides):
    """On this rank: (parameter shapes in order, the planner's; (params, optimizer state) bytes after a
    step, the planner's (gradients are planned as the parameters, whatever the objective: tests/test_memory.py); the live activation peak of a forward and backward, the planner's)."""
    tp = distributed.tp_size() if torch.distributed.is_initialized() else 1
    dp = distributed.dp_size() if torch.distributed.is_initialized() else 1
    groups = (distributed.dp_group(), distributed.tp_group()) if torch.distributed.is_initialized() else (None, None)
    cfg = small_config(*MEDIUM, "model.loss=catlip", vocabulary, f"tp={tp}", *overrides)
    layout = Layout.from_config(cfg, dp).replace(micro_batch=2)
    model = precision.prepare_model(CLIPModel(cfg.model, PLANNER_CLASSES), cfg)
    shapes = ([(n, tuple(p.shape)) for n, p in model.named_parameters()], list(parameter_shapes(cfg.model, tp).items()))
    images, _ = fixed_batch(cfg, 2)
    targets = (torch.rand(2, PLANNER_CLASSES, generator=torch.Generator().manual_seed(0)) < 0.01).float()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # as the flat gradient buffers are, before the forward
    live = LiveBytes([t for p in model.parameters() for t in (p, p.grad)])
    with live:  # clones: the model's batch is its own, as a freshly copied device batch would be
        catlip_loss(model.classify(images.clone()), targets.clone(), groups[1], groups[0]).backward()
    model.zero_grad(set_to_none=True)
    optimizer = build_optimizer(model, cfg.model, *groups)
    catlip_loss(model.classify(images), targets, groups[1], groups[0]).backward()
    optimizer.finish_gradients(1.0)
    optimizer.step()
    plan = plan_memory(cfg, layout)
    held = (tensor_bytes(model.parameters()), optimizer_state_bytes(optimizer, model))
    return shapes, (held, (plan.params, plan.optimizer_state)), (live.peak, plan.activations)


@pytest.mark.parametrize("world,tp,overrides", [
    (1, 1, []), (1, 1, ["precision=bf16", "model.megatron_amp_O2=true"]),
    (2, 2, ["precision=bf16", "model.megatron_amp_O2=true"]),
], ids=["fp32", "bf16-O2", "tp2-O2"])
def test_planner_counts_the_head_and_no_text_tower(tmp_path, world, tp, overrides):
    """The planner's parameter shapes, bytes held after a step (plain fused_adam: the distributed
    optimizer's buckets come from the same shapes, as tests/test_memory.py checks) and activation peak."""
    vocabulary = write_vocabulary(tmp_path / "synsets.tsv", PLANNER_CLASSES)
    results = ([catlip_parameters_and_bytes(vocabulary, overrides)] if world == 1 else
               run_distributed(catlip_parameters_and_bytes, world, tp, vocabulary, overrides))
    for (shapes, planned_shapes), (held, planned_held), (peak, planned_peak) in results:
        assert shapes == planned_shapes and shapes[-1] == ("catlip_head.bias", (PLANNER_CLASSES // tp,))
        assert not any(name.startswith("text.") for name, _ in shapes)
        assert held == planned_held
        # the activation terms as the planner's other tests (tests/test_memory.py) argue them: fp32 exact
        # but for a few small tensors; O2 on CPU keeps LayerNorm statistics in bf16, CUDA and the planner fp32
        assert planned_peak == pytest.approx(peak, rel=3e-3)


def test_planner_knows_the_synthetic_classes_and_refuses_an_indivisible_head(tmp_path):
    cfg = small_config("model.loss=catlip")
    assert parameter_shapes(cfg.model, 2)["catlip_head.weight"] == (10, 16)  # the synthetic set's 20 classes
    assert layout_problem(small_config("model.loss=catlip", write_vocabulary(tmp_path / "v.tsv", 3)).model,
                          Layout(tp=2)) == "3 CatLIP classes"

"""The gradients' DP reduction overlapped with backward (model.optim.overlap_grad_sync) changes not a
bit: same buckets, same collectives on the same values, only started earlier. And it does start
earlier: before backward has ended."""
import re

import pytest
import torch

from megaclip import accumulation, distributed, precision
from megaclip.config import ConfigError, load_config
from megaclip.config_checks import validate
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel
from megaclip.objectives import build_objective
from megaclip.optim import build_optimizer
from tests.distributed import run_distributed
from tests.helpers import fixed_batch, small_config
from tests.test_fusion import FUSION

GLOBAL_BATCH = 8
SMALL_BUCKETS = "model.optim.bucket_size_mb=0.02"  # ~5k fp32 elements: a dozen buckets in the small model
CHECKPOINTING = [f"model.{tower}.{key}={value}" for tower in ("vision", "text") for key, value in (
    ("activations_checkpoint_granularity", "full"), ("activations_checkpoint_method", "uniform"),
    ("activations_checkpoint_num_layers", 1))]


def train(overrides, overlap: bool, steps: int, micro_batches: int, compile_backend=None):
    """Per-step losses, the parameters after ``steps`` clipped steps of ``micro_batches`` backward passes
    each (all but the last inside the optimizer's no_sync), and the number of buckets."""
    cfg = small_config(f"tp={distributed.tp_size()}", "model.vision.class_token_length=2", "model.optim.grad_clip=0.5",
                       SMALL_BUCKETS, f"model.optim.overlap_grad_sync={overlap}", *overrides)
    distributed.seed_everything(5)
    model = precision.prepare_model(CLIPModel(cfg.model), cfg)
    if compile_backend:
        for tower in (model.visual, model.text):
            tower.transformer.compile_layers(compile_backend)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    loss_fn = ClipLoss(group=distributed.dp_group())
    per_rank = GLOBAL_BATCH // distributed.dp_size()
    losses = []
    for step in range(steps):
        images, tokens = fixed_batch(cfg, GLOBAL_BATCH, seed=step)
        first = distributed.dp_rank() * per_rank
        for i in range(micro_batches):
            # each micro step a contrastive loss of its own: accumulation's plumbing, not GradCache's maths
            rows = slice(first + i * per_rank // micro_batches, first + (i + 1) * per_rank // micro_batches)
            with precision.autocast(cfg, torch.device("cpu")):
                loss = loss_fn(*model(images[rows], tokens[rows]))
            if i < micro_batches - 1:
                with optimizer.no_sync():
                    loss.backward()
            else:
                loss.backward()
            losses.append(loss.detach())
        optimizer.finish_gradients(cfg.model.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    optimizer.wait_for_params()  # read outside a forward
    return torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters()}, len(optimizer.gradients.buckets)


def overlap_changes_nothing(overrides, micro_batches=1, compile_backend=None):
    on = train(overrides, True, 3, micro_batches, compile_backend)
    off = train(overrides, False, 3, micro_batches, compile_backend)
    return (torch.equal(on[0], off[0]) and all(torch.equal(on[1][n], off[1][n]) for n in off[1]),
            on[2], bool(torch.isfinite(on[0]).all()))


@pytest.mark.parametrize("world,tp,overrides,micro_batches", [
    (2, 1, CHECKPOINTING, 1),
    (2, 1, ["precision=bf16", "model.megatron_amp_O2=true", "model.optim.name=distributed_fused_adam"], 2),
    (4, 2, ["model.sequence_parallel=true", "model.optim.name=distributed_fused_adam", *CHECKPOINTING], 1),
    (4, 2, ["model.optim.name=fused_adam"], 2),
], ids=["dp2-checkpointing", "dp2-bf16-O2-distributed-accumulation", "tp2xdp2-distributed-sequence-parallel-checkpointing",
        "tp2xdp2-accumulation"])
def test_overlapped_reduction_is_bit_identical(world, tp, overrides, micro_batches):
    # Both runs sum the same fp32 buffers with the same collectives in the same bucket order; overlap
    # only moves when each starts, so every loss and every weight must be equal bit for bit.
    for identical, buckets, finite in run_distributed(overlap_changes_nothing, world, tp, overrides, micro_batches):
        assert identical and finite
        assert buckets >= 8  # several buckets, started one by one


def test_overlapped_reduction_composes_with_compiled_layers():
    # aot_eager: dynamo's capture and autograd without inductor's code generation (minutes on CPU)
    for identical, buckets, finite in run_distributed(overlap_changes_nothing, 2, 1, [], 1, "aot_eager"):
        assert identical and finite and buckets >= 8


def started_when_backward_reached_the_images(overlap: bool, micro_batches: int):
    """How many buckets had started their reduction when the last backward of the step computed the
    images' gradient (the last thing it computes: vision's first layer, after the text tower), and how
    many there are. The fusion objective: its layers come last in the model, so their buckets are the
    first to start; with micro-batches the step runs the GradCache way, whose loss pass alone reaches
    them, and they must not hold back the others until the step's end."""
    cfg = small_config(SMALL_BUCKETS, f"model.optim.overlap_grad_sync={overlap}", *FUSION)
    distributed.seed_everything(5)
    model = CLIPModel(cfg.model)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    objective = build_objective(cfg.model, distributed.dp_group())
    seen, features = [], objective.features

    def features_watching_the_images(model, images, tokens):
        if torch.is_grad_enabled():  # the passes that backward runs through
            images = images.clone().requires_grad_(True)
            images.register_hook(lambda grad: seen.append(sum(b.started for b in optimizer.gradients.buckets)))
        return features(model, images, tokens)

    objective.features = features_watching_the_images
    accumulation.step(objective, model, *fixed_batch(cfg, 4), micro_batches, torch.device("cpu"), optimizer)
    optimizer.finish_gradients(1.0)
    return seen[-1], len(optimizer.gradients.buckets)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_buckets_start_their_reduction_before_backward_ends(micro_batches):
    for started, buckets in run_distributed(started_when_backward_reached_the_images, 2, 1, True, micro_batches):
        # all but the buckets of vision's first layers (whose gradients come with the image's)
        assert buckets // 2 <= started < buckets, (started, buckets)
    for started, _ in run_distributed(started_when_backward_reached_the_images, 2, 1, False, micro_batches):
        assert started == 0


def test_a_second_backward_outside_no_sync_is_refused():
    cfg = small_config()
    model = CLIPModel(cfg.model)
    optimizer = build_optimizer(model, cfg.model)
    images, tokens = fixed_batch(cfg, 4)
    ClipLoss()(*model(images, tokens)).backward()
    with pytest.raises(RuntimeError, match=re.escape("inside optimizer.no_sync()")):
        ClipLoss()(*model(images, tokens)).backward()


def test_a_gradient_after_gradients_final_is_refused_inside_no_sync_too():
    # gradients_final starts the buckets of the parameters it is given; a later backward reaching one of
    # them, even inside no_sync, would add into a buffer its collective may be reading
    cfg = small_config()
    model = CLIPModel(cfg.model)
    optimizer = build_optimizer(model, cfg.model)
    optimizer.gradients_final(list(model.parameters()))  # every bucket complete: all of them start
    images, tokens = fixed_batch(cfg, 4)
    with optimizer.no_sync(), pytest.raises(RuntimeError, match=re.escape("optimizer.gradients_final only parameters")):
        ClipLoss()(*model(images, tokens)).backward()


def test_bucket_size_is_validated():
    with pytest.raises(ConfigError, match=re.escape("model.optim.bucket_size_mb must be > 0, got 0")):
        validate(load_config("clip_tiny", ["model.optim.bucket_size_mb=0"]), world_size=1, data=False)


def test_an_optimizer_built_again_on_a_model_takes_it_over():
    cfg = small_config()
    model = CLIPModel(cfg.model)
    images, tokens = fixed_batch(cfg, 4)
    build_optimizer(model, cfg.model)
    optimizer = build_optimizer(model, cfg.model)  # the first one's hooks are gone with its buckets
    for _ in range(2):
        ClipLoss()(*model(images, tokens)).backward()
        optimizer.finish_gradients(1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad.data_ptr() == p.main_grad.data_ptr() for p in model.parameters())


PARAM_SYNC = ["precision=bf16", "model.megatron_amp_O2=true", "model.optim.name=distributed_fused_adam",
              "model.optim.overlap_param_sync=true"]


def param_sync_changes_nothing(overrides, compile_backend=None):
    """The overlapped gradient reduction with the weights' all-gathers waited for in the next forward,
    vs neither overlapped (the same three steps)."""
    on = train([*PARAM_SYNC, *overrides], True, 3, 1, compile_backend)
    off = train([*PARAM_SYNC[:-1], *overrides], False, 3, 1, compile_backend)
    return torch.equal(on[0], off[0]) and all(torch.equal(on[1][n], off[1][n]) for n in off[1])


@pytest.mark.parametrize("world,tp,overrides,compile_backend", [
    (2, 1, CHECKPOINTING, None), (4, 2, ["model.sequence_parallel=true"], None), (2, 1, [], "aot_eager")],
    ids=["dp2-checkpointing", "tp2xdp2-sequence-parallel", "dp2-compiled"])
def test_weights_gathered_during_the_next_forward_change_nothing(world, tp, overrides, compile_backend):
    assert all(run_distributed(param_sync_changes_nothing, world, tp, overrides, compile_backend))


def gathers_left_after(forward: str):
    """Buckets whose all-gather is still unwaited after a step, and after one tower's forward."""
    cfg = small_config(SMALL_BUCKETS, *PARAM_SYNC)
    distributed.seed_everything(5)
    model = precision.prepare_model(CLIPModel(cfg.model), cfg)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    images, tokens = fixed_batch(cfg, 4)
    ClipLoss(group=distributed.dp_group())(*model(images, tokens)).backward()
    optimizer.finish_gradients(1.0)
    optimizer.step()
    after_step = set(optimizer.gathering)
    getattr(model, forward)(images if forward == "encode_image" else tokens)
    return len(optimizer.buckets), after_step, set(optimizer.gathering), {
        i for i, b in enumerate(optimizer.buckets) if any(n.startswith("visual.") for n, _ in b.params)}


def test_a_bucket_is_waited_for_at_its_first_use():
    for buckets, after_step, after_vision, vision in run_distributed(gathers_left_after, 2, 1, "encode_image"):
        # the logit scale (the root's own, read by the loss and the clamp) is waited for in step()
        assert len(after_step) == buckets - 1
        # the image tower's forward waited for its own buckets, the text tower's are still running
        assert after_vision == after_step - vision and after_vision

"""The memory switches change nothing but memory: distributed fused Adam vs plain AdamW, activation
checkpointing and sequence parallel vs neither; bf16 O2 trains with fp32 master weights."""
import pytest
import torch

from megaclip import distributed, precision
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel
from megaclip.optim import build_optimizer
from tests.distributed import run_distributed
from tests.helpers import fixed_batch, full_tensors, small_config

GLOBAL_BATCH = 8


def train_steps(overrides, steps, same_batch=False):
    """Per-step losses and the full-size parameters after ``steps`` clipped optimizer steps; each DP
    rank takes its rows of the same global batches."""
    cfg = small_config(f"tp={distributed.tp_size()}", "model.optim.grad_clip=0.5", *overrides)
    distributed.seed_everything(5)
    model = precision.prepare_model(CLIPModel(cfg.model), cfg)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    loss_fn = ClipLoss(group=distributed.dp_group())
    per_rank = GLOBAL_BATCH // distributed.dp_size()
    rows = slice(distributed.dp_rank() * per_rank, (distributed.dp_rank() + 1) * per_rank)
    losses, norms = [], []
    for step in range(steps):
        images, tokens = fixed_batch(cfg, GLOBAL_BATCH, seed=0 if same_batch else step)
        with precision.autocast(cfg, torch.device("cpu")):
            loss = loss_fn(*model(images[rows], tokens[rows]))
        loss.backward()
        norms.append(optimizer.finish_gradients(cfg.model.optim.grad_clip).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    params = {name: value.float() for name, (value, _) in full_tensors(model, cfg).items()}
    return losses, norms, params, optimizer


def summary(overrides, steps, same_batch=False):
    losses, norms, params, optimizer = train_steps(overrides, steps, same_batch)
    return losses, norms, params


@pytest.fixture(scope="module")
def plain_adamw():
    return run_distributed(summary, 1, 1, ["model.optim.name=fused_adam"], 5)[0]


def relative_error(params, reference):
    """||params - reference|| / ||reference|| over the whole model."""
    diff = sum(((params[n] - reference[n]) ** 2).sum() for n in reference)
    return (diff / sum((reference[n] ** 2).sum() for n in reference)).sqrt().item()


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 1), (4, 2)], ids=["dp1", "dp2", "tp2xdp2"])
def test_distributed_fused_adam_equals_plain_adamw_on_one_process(plain_adamw, world, tp):
    ref_losses, ref_norms, ref_params = plain_adamw
    assert max(ref_norms) > 0.5  # clipping was active
    for losses, norms, params in run_distributed(summary, world, tp, ["model.optim.name=distributed_fused_adam"], 5):
        # Other layouts sum gradients (and norms) in other orders: each step's result moves by a few
        # fp32 roundings of the parameters (eps = 1.2e-7). Adam passes a relative change of the
        # gradient on to its update unamplified (m / sqrt(v) is scale-free) except where |g| is near
        # its eps (1e-6), and there the update lr * g / eps is itself tiny; so five steps stay within
        # 5 steps * ~1.5 eps ~ 1e-6 of the model's norm.
        assert relative_error(params, ref_params) <= 1e-6
        # The loss is cross-entropy over logits s * cos with s = 1 / 0.07 ~ 14: features that moved
        # by the parameters' relative 1e-6 move it by at most 2 * 14 * 1e-6 on a loss of ~ln 8 ~ 2.
        assert losses == pytest.approx(ref_losses, rel=2e-5)
        # A gradient is a sum of terms as large as the first steps' gradients that later cancel to a
        # smaller norm; its rounding scales with the terms, so the bound is relative to the largest norm.
        assert norms == pytest.approx(ref_norms, abs=1e-5 * max(ref_norms))


FP32_EPS = torch.finfo(torch.float32).eps  # 2**-23: one rounding errs by at most half of it


def one_step_from_given_gradients(optimizer_name):
    """(lr, gradient norm, full-size parameters) after one clipped step of ``optimizer_name`` from the
    gradients of a separate plain model with the same weights, so that both optimizers start from
    bitwise the same parameters and gradients (the same kernels ran on the same inputs to make them)."""
    cfg = small_config(f"tp={distributed.tp_size()}", "model.optim.grad_clip=0.5", f"model.optim.name={optimizer_name}")
    distributed.seed_everything(5)
    source = CLIPModel(cfg.model)
    distributed.seed_everything(5)
    model = CLIPModel(cfg.model)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    per_rank = GLOBAL_BATCH // distributed.dp_size()
    rows = slice(distributed.dp_rank() * per_rank, (distributed.dp_rank() + 1) * per_rank)
    images, tokens = fixed_batch(cfg, GLOBAL_BATCH)
    ClipLoss(group=distributed.dp_group())(*source(images[rows], tokens[rows])).backward()
    for p, given in zip(model.parameters(), source.parameters()):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(given.grad)  # the distributed optimizer's .grad are views into its buckets
    norm = optimizer.finish_gradients(cfg.model.optim.grad_clip).item()
    optimizer.step()
    return cfg.model.optim.lr, norm, {name: value.float() for name, (value, _) in full_tensors(model, cfg).items()}


@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)], ids=["dp2", "tp2xdp2"])
def test_distributed_fused_adam_equals_plain_adamw_tensor_by_tensor(world, tp):
    """One step at the same layout, element by element, to a bound that follows from fp32 rounding.

    The two optimizers get bitwise the same parameters and averaged gradients (a sum of two is
    exact in either order) but differ in two ways: the gradient norm is summed per bucket instead of
    per tensor, so the clip coefficient differs by its relative change dc (measured: the two returned
    norms); and torch's fused AdamW runs over one flat shard instead of tensor by tensor, so elements
    fall on other vector / scalar-tail code paths (FMA or not, AVX2 or AVX-512). Adam's first update is
    u = m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps): |u| < 1, and scaling g by (1 + dc) moves u by at
    most dc. Each kernel computes u in about ten fp32 roundings (within 8 eps of exact, so the two within
    16 eps) and then p * (1 - lr * wd) - lr * u in two more (within 2 eps of |p| + lr each). So per
    element |p_a - p_b| <= lr * (dc + 16 eps) + 4 eps * (|p| + lr). Several steps cannot be compared this
    way: Adam divides by sqrt(v), which turns rounding differences of gradients near zero into update
    differences that grow with every step; the whole-model test above covers five steps."""
    lr, plain_norm, plain = run_distributed(one_step_from_given_gradients, world, tp, "fused_adam")[0]
    for _, norm, params in run_distributed(one_step_from_given_gradients, world, tp, "distributed_fused_adam"):
        # Both norms sum squares (positive terms, so no cancellation): pairwise within a tensor or
        # bucket (at most log2(numel) < 20 roundings deep), then at most ~70 partial sums in a row;
        # each is within 90 * 2**-24 < 6e-6 of exact, and the square root halves that.
        dc = abs(norm - plain_norm) / min(norm, plain_norm)
        assert dc <= 6e-6
        for name, value in params.items():
            torch.testing.assert_close(value, plain[name], rtol=4 * FP32_EPS, atol=lr * (dc + 20 * FP32_EPS), msg=name)


def optimizer_state_numel(overrides):
    """Adam moments plus, for the flat optimizer, its fp32 master weights."""
    optimizer = train_steps(overrides, 1)[3]
    moments = sum(t.numel() for state in optimizer.state.values() for k, t in state.items() if k != "step")
    return moments + sum(b.master.numel() for b in getattr(optimizer, "buckets", []))


def test_distributed_optimizer_state_is_sharded_over_dp():
    plain = run_distributed(optimizer_state_numel, 1, 1, ["model.optim.name=fused_adam"])[0]
    sharded = run_distributed(optimizer_state_numel, 2, 1, ["model.optim.name=distributed_fused_adam"])
    # plain: 2 moments per element; sharded: master + 2 moments on half the elements, plus at most one
    # padding element per bucket
    assert all(0 <= s - 3 * (plain / 2) / 2 <= 3 * 8 for s in sharded)


def o2_run(steps):
    losses, _, _, optimizer = train_steps(["precision=bf16", "model.megatron_amp_O2=true"], steps, same_batch=True)
    model_dtypes = {p.dtype for b in optimizer.buckets for _, p in b.params}
    return losses, [b.master.dtype for b in optimizer.buckets], model_dtypes


def test_bf16_o2_trains_with_fp32_master_weights():
    losses, master_dtypes, model_dtypes = run_distributed(o2_run, 2, 2, 8)[0]
    assert set(master_dtypes) == {torch.float32}
    assert model_dtypes == {torch.bfloat16, torch.float32}  # fp32: the logit scale only
    assert losses[-1] < 0.7 * losses[0]
    fp32 = run_distributed(summary, 2, 2, [], 8, True)[0][0]
    # bf16 keeps 8 bits of mantissa (relative rounding 2**-9 ~ 0.2 % per operation, a few percent through
    # the layers); the loss is a training signal here, not a kernel comparison: within 5 % over 8 steps
    assert losses == pytest.approx(fp32, rel=0.05)


def loss_and_grads(overrides, compile_backend=None):
    cfg = small_config(f"tp={distributed.tp_size()}", "model.vision.class_token_length=2",
                       "model.text.encoder_seq_length=7", *overrides)
    distributed.seed_everything(9)
    model = CLIPModel(cfg.model)
    if compile_backend:
        for tower in (model.visual, model.text):
            tower.transformer.compile_layers(compile_backend)
    images, tokens = fixed_batch(cfg, 4)
    loss = ClipLoss()(*model(images, tokens))
    loss.backward()
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    optimizer.finish_gradients(0.0)  # sums sequence-parallel gradients over TP
    return loss.item(), {name: grad for name, (_, grad) in full_tensors(model, cfg).items()}


def assert_same_loss_and_grads(result, reference, rtol):
    loss, grads = result
    assert loss == pytest.approx(reference[0], rel=rtol)
    for name, grad in grads.items():
        ref = reference[1][name]
        torch.testing.assert_close(grad, ref, rtol=rtol, atol=rtol * ref.abs().max().item(), msg=name)


@pytest.fixture(scope="module")
def tp2_plain():
    return run_distributed(loss_and_grads, 2, 2, [])[0]


@pytest.mark.parametrize("method,layers", [("uniform", 1), ("uniform", 2), ("block", 1), ("block", 2)])
def test_activation_checkpointing_changes_nothing(tp2_plain, method, layers):
    overrides = [f"model.{tower}.{key}={value}" for tower in ("vision", "text") for key, value in (
        ("activations_checkpoint_granularity", "full"), ("activations_checkpoint_method", method),
        ("activations_checkpoint_num_layers", layers))]
    # Recomputation runs the same kernels on the same inputs, so activations are bitwise the first
    # pass's; only the order in which autograd adds a residual stream's two gradient contributions may
    # change: a few fp32 roundings (eps 1.2e-7) of the tensor's largest gradient, within 1e-6 (8 eps).
    for result in run_distributed(loss_and_grads, 2, 2, overrides):
        assert_same_loss_and_grads(result, tp2_plain, rtol=1e-6)


def test_sequence_parallel_changes_nothing(tp2_plain):
    # Replicated parameters' gradients are summed per sequence shard and then over TP: another order of
    # sums of up to ~1e4 products (batch x positions x width), ~sqrt(n) eps ~ 1e-5 of the largest gradient.
    for result in run_distributed(loss_and_grads, 2, 2, ["model.sequence_parallel=true"]):
        assert_same_loss_and_grads(result, tp2_plain, rtol=1e-5)


@pytest.mark.parametrize("world", [1, 2], ids=["tp1", "tp2"])
def test_compiled_layers_change_nothing(tp2_plain, world):
    # aot_eager: dynamo's graph capture and autograd without inductor's code generation (minutes on CPU)
    reference = tp2_plain if world == 2 else run_distributed(loss_and_grads, 1, 1, [])[0]
    # aot_eager runs the same aten kernels eagerly (only the autograd graph is traced), so the results
    # match but for the order of gradient accumulation, as with checkpointing: within 8 eps.
    for result in run_distributed(loss_and_grads, world, world, [], "aot_eager"):
        assert_same_loss_and_grads(result, reference, rtol=1e-6)

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
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        assert relative_error(params, ref_params) <= 1e-6


def test_distributed_fused_adam_equals_plain_adamw_tensor_by_tensor_at_dp2():
    # One process sums gradients in another order than DP=2 does, and Adam's division by sqrt(v)
    # magnifies that rounding on near-zero gradients to ~1e-4 of some small tensors (plain AdamW at
    # DP=2 shows the same); at the same layout the two optimizers must agree element by element.
    plain = run_distributed(summary, 2, 1, ["model.optim.name=fused_adam"], 5)[0][2]
    for _, _, params in run_distributed(summary, 2, 1, ["model.optim.name=distributed_fused_adam"], 5):
        for name, value in params.items():
            value, ref = without_key_bias(name, value), without_key_bias(name, plain[name])
            torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item(), msg=name)


def without_key_bias(name, tensor):
    """The key bias gets a zero gradient in exact arithmetic (softmax ignores a shift shared by all
    keys), so Adam, dividing by sqrt(v), turns its rounding noise into updates of size lr * noise / eps
    that no two summation orders share. Compare the query and value biases only."""
    if not name.endswith("attn.qkv.bias"):
        return tensor
    return tensor.view(-1, 3, tensor.numel() // 12)[:, [0, 2]]  # [heads, (q, k, v), head_dim]; 4 heads


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
    # bf16 carries 8 bits of mantissa: over 8 steps the loss curves agree to a few percent
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
    for result in run_distributed(loss_and_grads, 2, 2, overrides):
        assert_same_loss_and_grads(result, tp2_plain, rtol=1e-6)


def test_sequence_parallel_changes_nothing(tp2_plain):
    for result in run_distributed(loss_and_grads, 2, 2, ["model.sequence_parallel=true"]):
        assert_same_loss_and_grads(result, tp2_plain, rtol=1e-5)


@pytest.mark.parametrize("world", [1, 2], ids=["tp1", "tp2"])
def test_compiled_layers_change_nothing(tp2_plain, world):
    # aot_eager: dynamo's graph capture and autograd without inductor's code generation (minutes on CPU)
    reference = tp2_plain if world == 2 else run_distributed(loss_and_grads, 1, 1, [])[0]
    for result in run_distributed(loss_and_grads, world, world, [], "aot_eager"):
        assert_same_loss_and_grads(result, reference, rtol=1e-6)

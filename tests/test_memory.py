"""The memory planner against what a built model really holds: parameter shapes; the bytes of
parameters, gradients and optimizer state after a step; the peak of live activation tensors in a
forward and backward. And the planner's table of model sizes."""
import runpy
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megaclip import distributed, precision
from megaclip.config import load_config
from megaclip.losses import ClipLoss
from megaclip.memory import GiB, Checkpointing, Layout, least_recompute_fit, plan_memory
from megaclip.memory_activations import activation_bytes
from megaclip.memory_parameters import optimizer_state_bytes as planned_optimizer_state_bytes
from megaclip.memory_parameters import parameter_shapes
from megaclip.model import CLIPModel
from megaclip.model.parallel import is_tensor_parallel
from megaclip.model.state import partition_dim
from megaclip.optim import build_optimizer
from tests.distributed import run_distributed
from tests.helpers import fixed_batch, small_config

TOOL = Path(__file__).resolve().parent.parent / "tools" / "plan_memory.py"
# Wider than helpers.SMALL so that activations, not bookkeeping, dominate; 2 class tokens make the
# vision sequence (66) divisible by 2 for sequence parallelism.
MEDIUM = ["model.vision.hidden_size=128", "model.vision.ffn_hidden_size=512", "model.vision.img_h=64",
          "model.vision.img_w=64", "model.vision.num_layers=6", "model.vision.class_token_length=2",
          "model.text.num_layers=3", "model.text.hidden_size=96", "model.text.ffn_hidden_size=384",
          "model.text.encoder_seq_length=15"]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> int:
    """The optimizer's state tensors (the scalar step left out), plus the parameters it steps that are
    not the model's own (fp32 master weights)."""
    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)]
    own = {id(p) for p in model.parameters()}
    masters = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]
    return tensor_bytes(state) + tensor_bytes(masters)


def measured_bytes(cfg, make_optimizer):
    """(params, grads, optimizer state) in bytes on this rank after one training step."""
    model = precision.prepare_model(CLIPModel(cfg.model), cfg)
    optimizer = make_optimizer(model)
    images, tokens = fixed_batch(cfg, batch=4)
    ClipLoss()(*model(images, tokens)).backward()
    finish_gradients = getattr(optimizer, "finish_gradients", None)  # megaclip's: average and clip, then step
    if finish_gradients:
        finish_gradients(1.0)
    optimizer.step()
    return tensor_bytes(model.parameters()), gradient_bytes(model), optimizer_state_bytes(optimizer, model)


def gradient_bytes(model: torch.nn.Module) -> int:
    """The gradients' storage, each buffer once: megaclip's optimizers keep them in flat fp32 buckets
    (``main_grad`` views; a bf16 parameter's ``.grad`` is None between steps)."""
    grads = [getattr(p, "main_grad", p.grad) for p in model.parameters()]
    return sum({g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}.values())


def planned_bytes(cfg, layout: Layout):
    plan = plan_memory(cfg, layout)
    return plan.params, plan.grads, plan.optimizer_state


def rank_layout(**choices) -> Layout:
    """A layout with this rank's TP and DP sizes (1 and 1 without a process group)."""
    if not torch.distributed.is_initialized():
        return Layout(**choices)
    return Layout(tp=distributed.tp_size(), dp=distributed.dp_size(), **choices)


def megaclip_optimizer(layout: Layout):
    cfg = small_config(f"tp={layout.tp}", f"precision={layout.precision}", f"model.megatron_amp_O2={layout.o2}",
                       f"model.optim.name={layout.optimizer}")
    groups = (distributed.dp_group(), distributed.tp_group()) if torch.distributed.is_initialized() else (None, None)
    return measured_bytes(cfg, lambda model: build_optimizer(model, cfg.model, *groups)), planned_bytes(cfg, layout)


# One function per optimizer path; each returns (measured, planned) on its rank.

def fused_adam_fp32():
    layout = rank_layout(precision="32", optimizer="fused_adam")
    cfg = small_config(f"tp={layout.tp}")
    measured = measured_bytes(cfg, lambda model: torch.optim.AdamW(model.parameters(), fused=True))
    return measured, planned_bytes(cfg, layout)


def fused_adam_bf16_o2():
    return megaclip_optimizer(rank_layout(precision="bf16", o2=True, optimizer="fused_adam"))


def distributed_fused_adam_bf16_o2():
    return megaclip_optimizer(rank_layout(precision="bf16", o2=True, optimizer="distributed_fused_adam"))


@pytest.mark.parametrize("path, world, tp", [
    (fused_adam_fp32, 1, 1), (fused_adam_fp32, 2, 2), (fused_adam_bf16_o2, 1, 1), (fused_adam_bf16_o2, 2, 2),
    (distributed_fused_adam_bf16_o2, 3, 1),  # DP 3: buckets that do not divide evenly
    (distributed_fused_adam_bf16_o2, 4, 2),
])
def test_params_grads_and_optimizer_state_match_the_model(path, world, tp):
    # One process builds plain nn.Linear / nn.Embedding layers at TP=1: no process group needed.
    results = [path()] if world == 1 else run_distributed(path, world, tp)
    for measured, planned in results:
        assert measured == planned


def model_parameters(tp: int):
    params = dict(CLIPModel(small_config(f"tp={tp}", "model.vision.class_token_length=2").model).named_parameters())
    return {n: tuple(p.shape) for n, p in params.items()}, {n for n, p in params.items() if is_tensor_parallel(p)}


@pytest.mark.parametrize("tp", [1, 2])
def test_parameter_shapes_are_the_models(tp):
    planned = parameter_shapes(small_config(f"tp={tp}", "model.vision.class_token_length=2").model, tp)
    for shapes, split in [model_parameters(tp)] if tp == 1 else run_distributed(model_parameters, tp, tp, tp):
        assert list(shapes.items()) == list(planned.items())  # in order: the optimizer buckets by it
        if tp > 1:  # megatron-core marks its split parameters; TP=1's plain layers have no marks
            assert split == {n for n in planned if partition_dim(n) is not None}


def test_distributed_optimizer_shards_every_bucket():
    layout = Layout(dp=4, optimizer="distributed_fused_adam")
    assert planned_optimizer_state_bytes(layout, [10, 3]) == 12 * (3 + 1)  # ceil(10/4) + ceil(3/4)


class LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage created under this mode that were alive at once; storages of
    ``existing`` tensors (parameters, gradients) are not counted, nor are views into them."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.sizes, self.live, self.peak = {}, 0, 0

    def _freed(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes and key not in self.existing:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.live)
        return out


def activation_peak(overrides, micro_batch: int = 2):
    """(live activation peak, planned) of one forward and backward on this rank, with gradients
    allocated up front as the flat gradient buffers are."""
    cfg = small_config(*MEDIUM, f"tp={rank_layout().tp}", *overrides)
    model = precision.prepare_model(CLIPModel(cfg.model), cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    images, tokens = fixed_batch(cfg, micro_batch)
    live = LiveBytes([t for p in model.parameters() for t in (p, p.grad)])
    with live:
        # Clones: the batch the model gets is its own, as a freshly copied device batch would be.
        ClipLoss(cfg.model.local_loss)(*model(images.clone(), tokens.clone())).backward()
    layout = Layout.from_config(cfg).replace(micro_batch=micro_batch)
    return live.peak, activation_bytes(cfg.model, layout).peak


def checkpoint(tower: str, method: str, layers: int):
    return [f"model.{tower}.activations_checkpoint_granularity=full",
            f"model.{tower}.activations_checkpoint_method={method}",
            f"model.{tower}.activations_checkpoint_num_layers={layers}"]


@pytest.mark.parametrize("overrides", [
    [],
    ["model.local_loss=false", "model.text.activation=quick_gelu"],
    checkpoint("vision", "uniform", 4) + checkpoint("text", "block", 2),
    checkpoint("vision", "block", 6),
    ["precision=bf16", "model.megatron_amp_O2=true"] + checkpoint("vision", "uniform", 2),
], ids=["fp32", "global-loss-quick-gelu", "uniform-block", "block-all", "bf16-O2"])
def test_activation_peak_matches_live_tensors(overrides):
    measured, planned = activation_peak(overrides)
    # O2 on CPU keeps LayerNorm statistics in bf16, CUDA (and the planner) in fp32.
    assert planned == pytest.approx(measured, rel=3e-3)


@pytest.mark.parametrize("overrides", [[], ["model.sequence_parallel=true"] + checkpoint("vision", "uniform", 2)],
                         ids=["tp2", "tp2-sequence-parallel"])
def test_activation_peak_matches_live_tensors_at_tp2(overrides):
    for measured, planned in run_distributed(least_activation_peak, 2, 2, overrides):
        assert planned == pytest.approx(measured, rel=3e-3)


def least_activation_peak(overrides, tries: int = 4):
    """gloo's worker thread sometimes holds a sequence collective's input until after the next
    allocation, raising a run's peak by a tensor or more; the least of a few runs has none of that."""
    runs = [activation_peak(overrides) for _ in range(tries)]
    return min(measured for measured, _ in runs), runs[0][1]


def step_transients(overrides):
    """(bytes that finishing the gradients and stepping allocate, planned, gradient bytes, buckets) on
    this rank, at the second step: the first also allocates the optimizer state."""
    cfg = small_config(*MEDIUM, *overrides)
    model = precision.prepare_model(CLIPModel(cfg.model), cfg)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    images, tokens = fixed_batch(cfg, batch=2)
    for _ in range(2):
        ClipLoss()(*model(images, tokens)).backward()
        held = [t for p in model.parameters() for t in (p, p.main_grad)]
        held += [p for group in optimizer.param_groups for p in group["params"]]
        held += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        live = LiveBytes(held)
        with live:
            optimizer.finish_gradients(1.0)
            optimizer.step()
        optimizer.zero_grad()
    plan = plan_memory(cfg, Layout.from_config(cfg, distributed.dp_size()))
    return live.peak, plan.optimizer_step, gradient_bytes(model), len(optimizer.gradients.buckets)


O2 = ["precision=bf16", "model.megatron_amp_O2=true"]


# distributed_fused_adam at DP 1 steps as at DP > 1 but for the collectives; with DP > 1 gloo's
# reduce-scatter itself allocates a copy of its input (through torch, so it would be counted), NCCL's does not.
@pytest.mark.parametrize("world,overrides", [(1, []), (2, []), (1, O2), (2, O2), (1, O2 + ["model.optim.name=distributed_fused_adam"])],
                         ids=["fp32", "fp32-dp2", "bf16-O2", "bf16-O2-dp2", "bf16-O2-distributed"])
def test_the_optimizer_step_copies_no_gradients(world, overrides):
    """The step used to allocate an fp32 copy of every bf16 gradient bucket (4 bytes per element, more
    than the gradients' own 2) and a square of the largest for the norm. Now the reductions run in
    place in the fp32 buffers, the norm squares no copy, the all-gather writes around its own input:
    what remains are scalars (a norm per bucket, the clip coefficient, the norms' sums), as planned."""
    for measured, planned, gradients, buckets in run_distributed(step_transients, world, 1, overrides):
        assert measured <= planned <= 4 * buckets + 64
        assert planned < gradients / 1000


@pytest.fixture(scope="module")
def tool():
    return runpy.run_path(str(TOOL))


def test_table_marks_impossible_layouts_and_shrinks_with_tp(tool):
    args = tool["parse_args"](["--table", "--dp", "8", "--micro-batch", "32", "--precision", "bf16", "--o2",
                               "--optimizer", "distributed_fused_adam"])
    rows = tool["table"](args)
    assert rows["clip_g14"][1][4] == "22 vision heads"
    totals = [rows["clip_G14"][1][tp] for tp in (1, 2, 4)]
    assert totals[0] > totals[1] > totals[2]


def test_fit_is_the_least_checkpointing_that_fits():
    cfg = load_config("clip_G14")
    layout = Layout(tp=1, dp=256, micro_batch=128, precision="bf16", o2=True, optimizer="distributed_fused_adam")
    budget = int(72 * GiB)
    fit = least_recompute_fit(cfg, layout, budget)
    assert fit.fits and fit.plan.total <= budget and fit.layout.vision_checkpointing.method == "block"
    vision_layers = fit.layout.vision_checkpointing.num_layers
    one_less = fit.layout.replace(vision_checkpointing=Checkpointing("block", vision_layers - 1))
    assert plan_memory(cfg, one_less).total > budget

"""model.transformer_impl / model.fp8: the config refuses what cannot run here in one line; the local
linears are unchanged; and, through a stand-in for transformer-engine (TE needs CUDA), the factory
puts TE's Linear behind every column and row linear with the same parameter names, shapes and values,
the same loss and gradients at TP 1 and 2 (also sequence parallel), and FP8 autocast around the GEMMs."""
import contextlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megaclip import distributed
from megaclip.checkpoint.model import load_model_for_inference, write_model_checkpoint
from megaclip.config import ConfigError
from megaclip.config_checks import validate
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel
from megaclip.model import attention
from megaclip.model.parallel import ColumnLinear, Linears, RowLinear, TorchLinear, is_tensor_parallel
from megaclip.model.state import full_state_dict, partition_dim
from tests.distributed import allreduce_sequence_parallel_grads, run_distributed
from tests.helpers import fixed_batch, full_tensors, small_config


def make_fake_te():
    """``transformer_engine.pytorch`` and ``.common.recipe`` as far as megaclip uses them: Linear with
    TE's constructor arguments (weight [out, in], bias, return_bias, init_method, params_dtype, device)
    and its 2-D view of the input,
    fp8_autocast, DelayedScaling and Format. The Linear records whether FP8 autocast was on, and with
    which format, at each forward."""
    state = {"fp8": None, "calls": []}

    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, bias=True, return_bias=False, init_method=None,
                     params_dtype=None, device="cuda", **unused):
            super().__init__()
            self.return_bias = return_bias
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
            self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=params_dtype, device=device)) if bias else None
            init_method(self.weight)
            # TE marks every weight tensor-parallel along dim 0, whatever its parallel mode
            self.weight.tensor_model_parallel, self.weight.partition_dim, self.weight.partition_stride = True, 0, 1

        def forward(self, x):
            state["calls"].append(state["fp8"])
            flat = x.view(-1, x.shape[-1])  # as TE does: an input that is not contiguous fails here
            out = F.linear(flat, self.weight, None if self.return_bias else self.bias).view(*x.shape[:-1], -1)
            return (out, self.bias) if self.return_bias else out

    @contextlib.contextmanager
    def fp8_autocast(enabled=True, fp8_recipe=None, **unused):
        previous, state["fp8"] = state["fp8"], fp8_recipe.fp8_format if enabled else None
        try:
            yield
        finally:
            state["fp8"] = previous

    class DelayedScaling:
        def __init__(self, fp8_format, reduce_amax=True, **unused):
            self.fp8_format, self.reduce_amax = fp8_format, reduce_amax

    te, pytorch, common, recipe = (types.ModuleType(n) for n in (
        "transformer_engine", "transformer_engine.pytorch", "transformer_engine.common", "transformer_engine.common.recipe"))
    pytorch.Linear, pytorch.fp8_autocast = Linear, fp8_autocast
    recipe.DelayedScaling, recipe.Format = DelayedScaling, types.SimpleNamespace(HYBRID="HYBRID", E4M3="E4M3")
    te.pytorch, te.common, common.recipe, te.__version__ = pytorch, common, recipe, "9.9"
    return {m.__name__: m for m in (te, pytorch, common, recipe)}, state


@pytest.fixture
def fake_te(monkeypatch):
    modules, state = make_fake_te()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return state


@pytest.fixture
def no_te(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)


def config_error(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate(small_config("model.vision.encoder_seq_length=null", *overrides), world_size=1, data=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_config_says_what_te_needs(no_te):
    message = config_error("model.transformer_impl=te")
    assert message.startswith("model.transformer_impl=te needs transformer-engine and a CUDA GPU; ")
    assert "does not import" in message and "model.transformer_impl=local" in message
    assert config_error("model.transformer_impl=fast") == "model.transformer_impl must be local or te, got 'fast'"
    assert config_error("model.fp8=e5m2") == "model.fp8 must be none, hybrid or e4m3, got 'e5m2'"
    assert "needs model.transformer_impl=te" in config_error("model.fp8=hybrid")


def test_config_with_te_but_no_gpu(fake_te, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch sees no GPU here" in config_error("model.transformer_impl=te", "model.fp8=hybrid")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(small_config("model.vision.encoder_seq_length=null", "model.transformer_impl=te", "model.fp8=hybrid"),
             world_size=1, data=False)  # accepted


def layer_classes(overrides, tp=1):
    def build():
        model = CLIPModel(small_config(f"tp={distributed.tp_size()}", *overrides).model)
        return {name: type(module).__name__ for name, module in model.named_modules() if name.endswith(
            ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))}
    return run_distributed(build, tp, tp)[0]


def test_local_is_the_default_and_unchanged():
    assert small_config().model.transformer_impl == "local" and small_config().model.fp8 == "none"
    for tp, column, row in ((1, TorchLinear, TorchLinear), (2, ColumnLinear, RowLinear)):
        classes = layer_classes([], tp)
        assert len(classes) == 16  # 2 towers x 2 layers x 4 linears
        for name, cls in classes.items():
            assert cls == (column if name.endswith(("qkv", "fc")) else row).__name__, name


def test_the_backend_is_said_once(fake_te, capsys, monkeypatch):
    monkeypatch.setattr(attention, "_said", set())
    linears = Linears(1, transformer_impl="te", fp8="hybrid")
    for _ in range(2):
        linears.column(8, 24, lambda w: torch.nn.init.normal_(w))
    assert capsys.readouterr().out == ("model.transformer_impl=te: transformer-engine 9.9's Linear behind the layers' "
                                       "linears, FP8 hybrid\n")


def test_a_te_checkpoint_loads_without_te(fake_te, monkeypatch, tmp_path):
    cfg = small_config("model.transformer_impl=te", "model.fp8=hybrid")
    full = full_state_dict(CLIPModel(cfg.model), cfg.model.text.vocab_size)
    write_model_checkpoint(tmp_path, full, cfg, tp=1)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # TE gone, as on a CPU machine
    model, _ = load_model_for_inference(tmp_path)
    assert {type(m) for n, m in model.named_modules() if n.endswith(("qkv", "fc", "proj")) and ".layers." in n} == {TorchLinear}
    for name, value in full_state_dict(model, cfg.model.text.vocab_size).items():
        assert torch.equal(value, full[name]), name


def loss_and_tensors(overrides, fake_te_calls=None):
    """Loss, full parameters and gradients of one batch (sequence-parallel gradients summed over TP, as
    the optimizer does), the classes backing the layers' linears, and the stand-in's FP8 record."""
    cfg = small_config(f"tp={distributed.tp_size()}", "model.vision.class_token_length=2", *overrides)
    distributed.seed_everything(3)
    model = CLIPModel(cfg.model)
    classes = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("qkv", "proj", "fc")) and ".layers." in n}
    loss = ClipLoss()(*model(*fixed_batch(cfg, 4)))
    loss.backward()
    allreduce_sequence_parallel_grads(model.parameters(), distributed.tp_group())
    # megatron-core's tensor-parallel marks where TP > 1 splits a parameter, none at TP=1 (as nn.Linear)
    for name, p in model.named_parameters():
        expected = partition_dim(name) if distributed.tp_size() > 1 else None
        assert (p.partition_dim if is_tensor_parallel(p) else None) == expected, name
    return loss.item(), full_tensors(model, cfg), classes, fake_te_calls


@pytest.fixture(scope="module")
def local_tp1():
    return run_distributed(loss_and_tensors, 1, 1, [])[0]


@pytest.mark.parametrize("tp,extra", [
    (1, []), (2, []), (2, ["model.sequence_parallel=true"]), (1, ["model.fp8=hybrid"]),
    # flash-attn's switch beside TE's linears (on CPU it falls back to SDPA, saying so)
    (2, ["model.vision.use_flash_attention=true", "model.text.use_flash_attention=true"]),
], ids=["tp1", "tp2", "tp2_sp", "tp1_fp8", "tp2_flash_switch"])
def test_te_linears_build_the_same_model(local_tp1, fake_te, tp, extra):
    ref_loss, ref_tensors, _, _ = local_tp1
    for loss, tensors, classes, fp8_calls in run_distributed(loss_and_tensors, tp, tp, ["model.transformer_impl=te", *extra],
                                                              fake_te["calls"]):
        assert classes == {"TELinear"}
        assert tensors.keys() == ref_tensors.keys()  # same names: checkpoints move between local and te
        # TP=1 runs the same products in the same order (F.linear); TP=2 sums the row linears' partial
        # products over ranks and sequence parallelism sums replicated gradients per shard: other orders
        # of up to ~1e4 fp32 products, ~sqrt(n) eps ~ 1e-5 of the tensor's largest gradient (as
        # tests/test_tensor_parallel.py argues).
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, (value, grad) in tensors.items():
            ref_value, ref_grad = ref_tensors[name]
            # one seed, drawn full-size and split: copies, no arithmetic
            torch.testing.assert_close(value, ref_value, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item(), msg=name)
        # every GEMM of the forward (2 towers x 2 layers x 4 linears) ran inside TE's FP8 autocast, or none did
        assert fp8_calls == [("HYBRID" if extra == ["model.fp8=hybrid"] else None)] * 16

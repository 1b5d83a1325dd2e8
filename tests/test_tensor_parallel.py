"""TP=1, 2, 4 build the same global model and give the same loss and full-shape gradients."""
import pytest
import torch

from megaclip import distributed
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel
from tests.distributed import run_distributed
from tests.helpers import fixed_batch, full_tensors, small_config


EIGHT_HEADS = ["model.vision.num_attention_heads=8", "model.text.num_attention_heads=8"]  # splittable up to TP=8


def full_params_and_grads(linear_impl: str = "auto"):
    """Loss of one fixed batch, and every parameter and gradient gathered to full size."""
    tp = distributed.tp_size()
    cfg = small_config(f"tp={tp}", f"model.linear_impl={linear_impl}", *EIGHT_HEADS)
    distributed.seed_everything(7)
    model = CLIPModel(cfg.model)
    images, tokens = fixed_batch(cfg, batch=6)
    loss = ClipLoss()(*model(images, tokens))
    loss.backward()
    return loss.item(), full_tensors(model, cfg)


@pytest.fixture(scope="module")
def reference():
    return run_distributed(full_params_and_grads, 1, 1)[0]


def assert_same_model(actual, expected, exact_params=True):
    (loss, tensors), (ref_loss, ref_tensors) = actual, expected
    # TP runs the same fp32 products in other summation orders (row linears sum partial results over
    # ranks): a gradient element sums up to ~1e4 products (batch x sequence x width), and reordering
    # moves it by ~sqrt(n) eps ~ 1e-5 of the size of its terms, which the tensor's largest gradient
    # bounds; the loss, a softmax over those features, follows at 1e-5.
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert tensors.keys() == ref_tensors.keys()
    for name, (value, grad) in tensors.items():
        ref_value, ref_grad = ref_tensors[name]
        assert value.shape == ref_value.shape, name
        if exact_params:  # every TP initialises full-size from one seed and splits: copies, no arithmetic
            torch.testing.assert_close(value, ref_value, rtol=0, atol=0, msg=f"init of {name}")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item(), msg=f"grad of {name}")


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tp_matches_single_device(reference, tp):
    results = run_distributed(full_params_and_grads, tp, tp)
    for rank_result in results:  # every TP rank sees the whole model's loss and gradients
        assert_same_model(rank_result, reference)


def test_megatron_linears_match_plain_linears_at_tp1(reference):
    assert_same_model(run_distributed(full_params_and_grads, 1, 1, "megatron")[0], reference)

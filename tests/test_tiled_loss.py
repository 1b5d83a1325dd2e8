"""The tiled contrastive loss (model.loss_block_size): the same loss and gradients as the whole logits, for
blocks that do and do not divide the batch, on one process and over DP; each tile computed once per pass;
memory that grows linearly."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megaclip import distributed
from megaclip.config import ConfigError
from megaclip.config_checks import validate
from megaclip.losses import ClipLoss
from megaclip.sigmoid_loss import sigmoid_loss
from tests.distributed import run_distributed
from tests.helpers import small_config
from tests.test_memory import LiveBytes

BATCH, WIDTH = 12, 16  # per rank
BLOCKS = [4, 5, 12, 64]  # divides, does not, the whole batch, more than it


def features(batch, seed=0):
    """Normalised float64 features (so rounding cannot hide a wrong block: see the tolerances) and scalars."""
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.nn.functional.normalize(torch.randn(batch, WIDTH, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(2))
    return x, y, torch.tensor(12.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)


def loss_and_gradients(name, block_size, dp_rank=0, dp_size=1, group=None):
    x, y, scale, bias = features(BATCH * dp_size)
    rows = slice(dp_rank * BATCH, (dp_rank + 1) * BATCH)
    x, y = x[rows].clone().requires_grad_(), y[rows].clone().requires_grad_()
    scale.requires_grad_(), bias.requires_grad_()
    if name == "siglip":
        loss = sigmoid_loss(x, y, scale, bias, group, block_size)
    else:
        loss = ClipLoss(local_loss=name.startswith("clip-local"), gather_with_grad=not name.endswith("without-gather-grad"),
                        group=group, block_size=block_size)(x, y, scale)
    loss.backward()
    return loss.detach(), x.grad, y.grad, scale.grad, bias.grad


def every_block(name):
    dp = distributed.dp_size()
    return {block: loss_and_gradients(name, block, distributed.dp_rank(), dp, distributed.dp_group())
            for block in [0] + BLOCKS}


def assert_same(tiled, whole):
    # float64 (eps 2.2e-16): a block sums its row's exp(logits) in another order and adds the blocks'
    # log-sum-exps; each loss or gradient element sums ~1e2 terms, so they agree to ~1e-14 of the largest.
    # 1e-10 is far below any mistake of a block (a lost or doubled block moves them by ~1e-2 or more).
    for got, ref in zip(tiled, whole):
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("name", ["clip-global", "clip-local", "siglip"])
@pytest.mark.parametrize("block", BLOCKS)
def test_tiled_equals_whole_on_one_process(name, block):
    assert_same(loss_and_gradients(name, block), loss_and_gradients(name, 0))


@pytest.fixture(scope="module", params=["clip-global", "clip-local", "clip-local-without-gather-grad", "siglip"])
def over_dp(request):
    return request.param, run_distributed(every_block, 3, 1, request.param)


def test_tiled_equals_whole_over_dp(over_dp):
    """DP 3: the gathered (CLIP) or ring-passed (SigLIP) columns in blocks, on every rank."""
    name, ranks = over_dp
    for results in ranks:
        for block in BLOCKS:
            assert_same(results[block], results[0])


def live_bytes(name, batch, block_size):
    x, y, scale, bias = features(batch)
    x.requires_grad_(), y.requires_grad_(), scale.requires_grad_(), bias.requires_grad_()
    live = LiveBytes([x, y, scale, bias])
    with live:
        if name == "siglip":
            sigmoid_loss(x, y, scale, bias, None, block_size).backward()
        else:
            ClipLoss(block_size=block_size)(x, y, scale).backward()
    return live.peak


@pytest.fixture
def one_thread():
    """Every op runs through the Python dispatch mode; with more threads than free cores each small op
    of the tiled loss waits for busy ones (~100x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tiled_memory_grows_linearly(name, one_thread):
    """Live bytes of the loss's forward and backward at B and 4B: the tiled loss keeps features, gradients
    and one block (linear: ≤ 4.5x with the block's constant; measured 2.7x and 1.7x), the whole loss B²
    logits (~16x)."""
    small, large = 256, 1024
    tiled = live_bytes(name, large, 64) / live_bytes(name, small, 64)
    whole = live_bytes(name, large, 0) / live_bytes(name, small, 0)
    assert tiled <= 4.5 and whole >= 12, (tiled, whole)


def matmul_flops(local, block_size):
    x, y, scale, _ = features(BATCH)
    x.requires_grad_(), y.requires_grad_(), scale.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        ClipLoss(local_loss=local, block_size=block_size)(x, y, scale).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("local", [False, True], ids=["global", "local"])
@pytest.mark.parametrize("block", [4, 5])
def test_tiled_loss_computes_each_tile_once(local, block):
    """Matmul FLOPs of forward and backward (the counter counts only matmuls: the positives' products
    are elementwise). The whole logits take 3 products of the logits' size (forward, and the two
    gradients); the tiled loss recomputes each tile once more in backward: 4, so at most 4/3 of the whole.
    Computing each tile for each direction of the global loss (2 + 6) would be 8/3."""
    assert matmul_flops(local, block) <= matmul_flops(local, 0) * 4 / 3


def test_clip_loss_stays_fp32_under_autocast():
    x, y, scale, _ = (t.float() for t in features(BATCH))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = [ClipLoss(block_size=b)(x, y, scale) for b in (0, 5)]
    assert all(torch.equal(got, ClipLoss(block_size=b)(x, y, scale)) for got, b in zip(under_autocast, (0, 5)))


@pytest.mark.parametrize("overrides,message", [
    (["model.loss_block_size=-1"], "model.loss_block_size must be >= 0, got -1"),
    (["model.loss_block_size=64", "model.loss=catlip"], "model.loss_block_size tiles the contrastive losses"),
])
def test_block_size_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate(small_config(*overrides, "model.vision.encoder_seq_length=null"), 1, data=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("local", [False, True], ids=["global", "local"])
@pytest.mark.parametrize("batch", [256, 1024])
def test_planner_estimates_the_tiled_loss(local, batch, one_thread):
    """The planner's tiled-loss bytes (kept + backward) against the live bytes of the loss's forward and
    backward, plus its input features (in a model the towers' normalised outputs, which the planner counts
    with the loss). An estimate from the code: within 15 % (measured 1-10 %)."""
    from megaclip.memory import Layout
    from megaclip.memory_activations import _loss

    cfg = small_config("model.loss_block_size=64", f"model.local_loss={local}", f"model.output_dim={WIDTH}")
    x, y, scale, _ = (t.float() for t in features(batch))
    x.requires_grad_(), y.requires_grad_(), scale.requires_grad_()
    live = LiveBytes([x, y, scale])
    with live:
        ClipLoss(local_loss=local, block_size=64)(x, y, scale).backward()
    kept, backward = _loss(cfg.model, Layout(micro_batch=batch))
    assert kept + backward == pytest.approx(live.peak + 2 * batch * WIDTH * 4, rel=0.15)

"""Fusion layers (model.fusion): cross-attention against a plain implementation; the hard-negative
sampler (same draw on every TP rank, ∝ softmax, never the positive); the fusion objective's loss and
full-size gradients at TP 1 = 2 = 4, with sequence parallelism and checkpointing, and DP=2 equal to one
process with the doubled batch given the same negatives; the row exchange on its own; the inference API."""
import math

import pytest
import torch

from megaclip import distributed
from megaclip.config import ConfigError
from megaclip.config_checks import validate
from megaclip.convert.open_clip import to_open_clip
from megaclip.exchange import fetch_rows
from megaclip.fusion_objective import draw_negatives, sample_hard_negatives
from megaclip.model import CLIPModel
from megaclip.model.fusion import CrossAttention
from megaclip.model.parallel import Linears
from megaclip.objectives import build_objective
from tests.distributed import allreduce_sequence_parallel_grads, average_gradients, run_distributed
from tests.helpers import fixed_batch, full_tensors, small_config

FUSION = ["model.fusion.num_layers=2", "model.vision.num_attention_heads=4", "model.text.num_attention_heads=4",
          "model.fusion.lm_weight=0.5"]
BATCH = 4  # per DP rank


def test_cross_attention_matches_plain_attention():
    torch.manual_seed(0)
    width, heads, d = 16, 4, 4
    layer = CrossAttention(width, heads, num_layers=2, dropout=0.0, linears=Linears(1))
    x, memory = torch.randn(3, 5, width), torch.randn(3, 7, width)
    q = (x @ layer.q.weight.T + layer.q.bias).view(3, 5, heads, d).transpose(1, 2)
    kv = (memory @ layer.kv.weight.T + layer.kv.bias).view(3, 7, heads, 2, d)
    k, v = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)  # [b, heads, 5, 7]
    expected = (weights @ v).transpose(1, 2).reshape(3, 5, width) @ layer.proj.weight.T + layer.proj.bias
    # fp32, SDPA's fused kernel against these matmuls: sums of <= 16 products in another order, 1e-6 of values ~1
    torch.testing.assert_close(layer(x, memory), expected, rtol=1e-5, atol=1e-5)


def test_sampler_never_draws_the_positive_nor_its_caption_and_follows_the_softmax():
    n, draws = 5, 20000
    logits = torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 2
    caption_id = torch.tensor([0, 1, 2, 2, 3])  # samples 2 and 3 share a caption
    own = torch.arange(n).repeat(draws)  # each row drawn `draws` times
    drawn = draw_negatives(logits[own], own, caption_id, torch.rand(len(own), generator=torch.Generator().manual_seed(1)))
    counts = torch.zeros(n, n).index_put_((own, drawn), torch.ones(len(own)), accumulate=True)
    excluded = caption_id.unsqueeze(0) == caption_id.unsqueeze(1)
    assert counts[excluded].sum() == 0
    expected = logits.masked_fill(excluded, float("-inf")).softmax(1)
    # binomial frequencies of 20000 draws: standard deviation <= 0.5/sqrt(20000) = 0.0035; 5 sigma
    torch.testing.assert_close(counts / draws, expected, rtol=0, atol=0.018)


def test_sampler_edges():
    logits = torch.randn(4, 4)
    own = torch.arange(4)
    # every caption alike: any other sample; the ends of [0, 1) stay in range and off the excluded ones
    for u in (0.0, 1 - 1e-7):
        drawn = draw_negatives(logits, own, torch.zeros(4, dtype=torch.long), torch.full((4,), u))
        assert ((drawn != own) & (drawn >= 0) & (drawn < 4)).all()
    # a row's draw depends on its own uniform only: rows 2 and 3 drawn alone as in the whole
    u = torch.rand(4)
    whole = draw_negatives(logits, own, own, u)
    assert torch.equal(draw_negatives(logits[2:], own[2:], own, u[2:]), whole[2:])


def test_sampler_in_blocks_draws_what_all_rows_at_once_draw():
    """Rows 5..14 of a global batch of 20 (a rank's rows), in blocks that divide them or not: the logits
    are asked for a block's rows at a time, and the same kernels on the same rows' values draw exactly
    the same."""
    g = torch.Generator().manual_seed(0)
    image_logits, text_logits = torch.randn(10, 20, generator=g) * 3, torch.randn(10, 20, generator=g) * 3
    own, caption_id, uniforms = torch.arange(5, 15), torch.arange(20) // 2, torch.rand(2, 10, generator=g)
    draws, asked = {}, {}
    for block in (0, 3, 7):
        asked[block] = []
        draws[block] = sample_hard_negatives(lambda rows: asked[block].append(rows) or image_logits[rows],
                                             lambda rows: text_logits[rows], own, caption_id, uniforms, block)
    assert [(r.start, r.stop) for r in asked[3]] == [(0, 3), (3, 6), (6, 9), (9, 10)] and len(asked[0]) == 1
    for block in (3, 7):
        assert all(torch.equal(x, y) for x, y in zip(draws[block], draws[0]))


def _rows_exchange():
    """Rank r holds rows 10r.. of a global batch; each rank asks for rows anywhere (repeats too)."""
    rank, size = distributed.dp_rank(), distributed.dp_size()
    local = (torch.arange(3.0) + 3 * rank).unsqueeze(1).repeat(1, 2).requires_grad_()
    wanted = torch.tensor([[5, 0, 5], [1, 4, 2]])[:size]
    got = fetch_rows(local, wanted, distributed.dp_group())
    (got * (1 + torch.arange(3.0)).unsqueeze(1)).sum().backward()
    return got.detach(), local.grad


def test_fetch_rows_moves_the_asked_rows_and_returns_their_gradients():
    (got0, grad0), (got1, grad1) = run_distributed(_rows_exchange, 2, 1)
    assert got0[:, 0].tolist() == [5, 0, 5] and got1[:, 0].tolist() == [1, 4, 2]
    # row 5 is asked twice by rank 0 (weights 1 and 3), row 0 once (weight 2), rows 1, 4, 2 by rank 1 (1, 2, 3)
    assert grad0[:, 0].tolist() == [2, 1, 3] and grad1[:, 0].tolist() == [0, 2, 4]


def fixed_negatives(image_logits, text_logits, own, caption_id, uniforms, block):
    """A fixed draw, the same for any layout: image i's caption i+1, caption i's image i+3 (mod N),
    crossing DP ranks."""
    n = len(caption_id)
    return (own + 1) % n, (own + 3) % n


def fusion_loss_and_grads(overrides, global_batch=2 * BATCH, record_draws=False):
    """Loss terms of DP rank r's rows of one fixed global batch and every parameter's full-size,
    DP-averaged gradient."""
    tp, dp = distributed.tp_size(), distributed.dp_size()
    cfg = small_config(f"tp={tp}", *FUSION, *overrides)
    distributed.seed_everything(7)
    model = CLIPModel(cfg.model)
    objective = build_objective(cfg.model, distributed.dp_group())
    draws = []
    if record_draws:
        objective.sample_negatives = lambda *a: draws.append(sample_hard_negatives(*a)) or draws[-1]
    else:
        objective.sample_negatives = fixed_negatives
    images, tokens = fixed_batch(cfg, batch=global_batch)
    local = global_batch // dp
    rows = slice(distributed.dp_rank() * local, (distributed.dp_rank() + 1) * local)
    loss, terms = objective(model, images[rows], tokens[rows])
    loss.backward()
    allreduce_sequence_parallel_grads(model.parameters(), distributed.tp_group())
    average_gradients(list(model.parameters()), distributed.dp_group())
    return {k: v.item() for k, v in terms.items()}, full_tensors(model, cfg), draws


def assert_same(result, reference, dp=1):
    (terms, tensors, _), (ref_terms, ref_tensors, _) = result, reference
    assert terms.keys() == {"contrastive", "itm", "lm"}
    # the ranks' ITM / LM terms are the means over their own pairs and tokens: the mean over DP ranks
    # equals the global one (checked by the caller); at DP 1 each equals the reference. fp32
    # reorderings as in test_tensor_parallel: 1e-5.
    if dp == 1:
        for name, value in terms.items():
            assert value == pytest.approx(ref_terms[name], rel=1e-5), name
    assert tensors.keys() == ref_tensors.keys()
    for name, (value, grad) in tensors.items():
        ref_value, ref_grad = ref_tensors[name]
        torch.testing.assert_close(value, ref_value, rtol=0, atol=0, msg=f"init of {name}")
        # as test_tensor_parallel: a gradient element sums up to ~1e4 fp32 products in another order
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item(), msg=f"grad of {name}")


SEQUENCE_PARALLEL = ["model.sequence_parallel=true"]
CHECKPOINTING = ["model.text.activations_checkpoint_granularity=full", "model.text.activations_checkpoint_method=uniform"]


@pytest.mark.parametrize("tp,layout", [(2, []), (4, []), (2, SEQUENCE_PARALLEL), (2, CHECKPOINTING)],
                         ids=["tp2", "tp4", "tp2-sequence-parallel", "tp2-checkpointing"])
def test_tensor_parallel_matches_one_process(tp, layout):
    # two class tokens: 2 + 4 patches divide by TP under sequence parallelism
    model = ["model.vision.class_token_length=2"]
    reference = run_distributed(fusion_loss_and_grads, 1, 1, model)[0]
    for rank_result in run_distributed(fusion_loss_and_grads, tp, tp, model + layout):
        assert_same(rank_result, reference)


@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)], ids=["dp2", "tp2xdp2"])
def test_data_parallel_matches_one_process_with_the_whole_batch(world, tp):
    dp = world // tp
    whole = run_distributed(fusion_loss_and_grads, 1, 1, [], dp * BATCH)[0]
    results = run_distributed(fusion_loss_and_grads, world, tp, [], dp * BATCH)
    for name in whole[0]:
        mean = sum(results[r][0][name] for r in range(0, world, tp)) / dp
        assert mean == pytest.approx(whole[0][name], rel=1e-5), name
    for result in results:
        assert_same(result, whole, dp=dp)


def test_every_tp_rank_draws_the_same_negatives():
    results = run_distributed(fusion_loss_and_grads, 2, 2, [], 2 * BATCH, True)
    (draw0,), (draw1,) = results[0][2], results[1][2]
    assert all(torch.equal(a, b) for a, b in zip(draw0, draw1))


def test_the_objective_draws_in_blocks_of_loss_block_size():
    """model.loss_block_size reaches the sampler; the features' rows 3 at a time (3, 3, 2 of 8) draw what
    all 8 draw (see the sampler's text for why exactly)."""
    assert build_objective(small_config(*FUSION, "model.loss_block_size=3").model, None).block_size == 3
    (tiled,), (whole,) = (run_distributed(fusion_loss_and_grads, 1, 1, overrides, 2 * BATCH, True)[0][2]
                          for overrides in (["model.loss_block_size=3"], []))
    assert all(torch.equal(a, b) for a, b in zip(tiled, whole))


def test_inference_api():
    cfg = small_config(*FUSION)
    torch.manual_seed(0)
    model = CLIPModel(cfg.model).eval()
    images, tokens = fixed_batch(cfg, batch=3)
    p = model.match_probability(images, tokens)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    embedding = model.encode_multimodal(images, tokens)
    assert embedding.shape == (3, cfg.model.text.hidden_size)
    # a pair's score does not depend on the other pairs in the batch
    torch.testing.assert_close(model.match_probability(images[:1], tokens[:1]), p[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (["model.loss=catlip"], "model.fusion.num_layers needs a contrastive loss"),
    (["model.fusion.num_attention_heads=3"], "model.fusion.num_attention_heads 3 does not divide the text width"),
    (["tp=4", "model.fusion.num_attention_heads=2"], "model.fusion.num_attention_heads 2 is not divisible by tensor_model"),
    (["gbs=1"], "global_batch_size must be >= 2"),
    (["model.fusion.rerank_k=0"], "model.fusion.rerank_k must be >= 1"),
])
def test_bad_fusion_settings_are_one_line(overrides, message):
    cfg = small_config("model.fusion.num_layers=1", "model.vision.encoder_seq_length=null", *overrides)
    with pytest.raises(ConfigError, match=message) as e:
        validate(cfg, cfg.model.tensor_model_parallel_size, data=False)
    assert "\n" not in str(e.value)


def test_exports_leave_the_fusion_layers_out_and_say_so(capsys):
    cfg = small_config(*FUSION, "model.text.tokenizer.library=clip_bpe", "model.text.vocab_size=49408",
                       "model.text.encoder_seq_length=77")
    full = {name: p.detach() for name, p in CLIPModel(cfg.model).named_parameters()}
    dual = to_open_clip(full, cfg.model)
    assert not any("fusion" in name for name in dual)
    assert capsys.readouterr().out.strip() == (
        "open_clip CLIP models have no fusion layers: exporting the dual encoder, "
        f"{sum(name.startswith('fusion.') for name in full)} fusion-layer tensors (model.fusion) left out")


def accumulated(micro_batches):
    """One step of DP rank r's rows in ``micro_batches`` parts (GradCache: the token states cached with
    the features), the same negatives however split: terms and DP-averaged full-size gradients."""
    from megaclip import accumulation

    cfg = small_config(*FUSION)
    distributed.seed_everything(7)
    model = CLIPModel(cfg.model)
    objective = build_objective(cfg.model, distributed.dp_group())
    objective.sample_negatives = fixed_negatives
    images, tokens = fixed_batch(cfg, batch=2 * BATCH)
    rows = slice(distributed.dp_rank() * BATCH, (distributed.dp_rank() + 1) * BATCH)
    _, terms = accumulation.step(objective, model, images[rows], tokens[rows], micro_batches, torch.device("cpu"))
    average_gradients(list(model.parameters()), distributed.dp_group())
    return {k: v.item() for k, v in terms.items()}, full_tensors(model, cfg), []


def test_micro_batches_accumulate_to_the_whole_batch():
    whole = run_distributed(accumulated, 2, 1, 1)
    for split, reference in zip(run_distributed(accumulated, 2, 1, 2), whole):
        assert_same(split, reference)  # the same sums in another grouping: fp32 as above

"""Bytes of the activations of one training step on one GPU (notation: megaclip.memory).

Activations of one micro batch, attention by flash/SDPA kernels (no s×s scores kept), counted as
PyTorch keeps and frees them. With patch dropout (model.vision.drop_patch_rate) the vision tower
trains on its class tokens + the kept patches (megaclip.model.regularisers.kept_patch_count); the
gather that picks them keeps the whole sequence it picks from, s·b·h·r, and the indices, 8 bytes each. Bytes per element: c = 2 under bf16, else 4; r, the residual stream and
LayerNorm inputs, = 4 under bf16 autocast (no O2: CUDA autocast runs LayerNorm in fp32, and fp32 +
bf16 adds to fp32), else c; m = 4 under autocast with megatron-core's linears (t > 1 without sequence
parallelism: their autograd functions save the fp32 input that autocast casts only inside the
matmul), else c. (On CPU megaclip runs megatron-core's linears in fp32 under autocast; these figures
are CUDA's.) A full layer keeps
    2·T·h·r/q   the LN inputs; the first is the layer input, in = T·h·r/q, all a checkpoint keeps
    2·T·h·m     the LN outputs as qkv and fc save them (after the sequence all-gather: whole)
    16·T/q      LN mean and rstd, fp32                   [+ 2·T·h/q bool masks with hidden dropout]
    4·T·h·c/t   q, k, v and the attention output (the same tensor is the proj input)
    4·T·n/t     attention log-sum-exp, fp32
    2·T·f·c/t   fc output and GELU output, the proj input (quick_gelu also its sigmoid: 3·T·f·c/t)
A tower of L layers, k = activations_checkpoint_num_layers, keeps at the end of the forward
    none: L full;   uniform: ceil(L/k) inputs;   block: min(k, L) inputs + (L - k)+ full
and, when its backward reaches the layers, the most of these (inputs waiting, full layers):
    none: (0, L);   uniform: (j, layers of chunk j) for every chunk j;   block: (k, L - k), (k - 1, 1)
(a recomputed chunk's own input is its first layer's), plus one layer's backward working set:
(T·f·c + f·h·c)/t, proj's input and weight gradients (under autocast +4 bytes per weight element,
its fp32 cast), + in, the residual stream's gradient [+ T·h·c under sequence parallelism, proj's
output gradient all-gathered]. By the time GELU's and attention's backward allocate, as much is freed.
Around the layers, whole on every TP rank: vision's start keeps the conv input b·3·H·W·c, the ln_pre
input T·h·r and its stats 8·T; text's start the token ids 8·b·ctx. A tower's head keeps the final
LN's input T·h·r and stats 8·T, the pooled rows b·h·c (vision's class token is a view that keeps all
of ln_post's output, T·h·r, unless autocast saves a bf16 copy or global average pooling a new tensor)
and the projection output b·o·c; the head is freed before the backward reaches the layers.
The loss, fp32, over N = d·b samples with R = b (local_loss) or N rows, keeps the normalised features
of the DP batch 2·N·o·4 and both directions' log-softmax 2·R·N·4; its backward adds 2·R·N·4. Tiled
(model.loss_block_size l) it keeps the features and the log-sum-exps 2·R·4 (the local loss's rows of
its two matrices, the global loss's rows and columns of one); its backward adds the feature gradients
2·N·o·4 + 2·R·o·4 and one tile's logits, softmax weights and a temporary 3·l²·4 (an estimate: within
10 % of the live bytes on CPU).
SigLIP's loss (megaclip.sigmoid_loss) keeps only the local features 2·b·o·4, whatever d; its backward
adds the feature gradients 2·b·o·4, one block's (or with l, one tile's) logits and the terms of their
gradient 6·b²·4 (6·l²·4), and per stream round the ring (min(d - 1, 2)) the message [block, its
gradient] sent and the one received, 4·b·o·4 (matched to live bytes at d = 1 within 0.3 %).
Gradient accumulation (k micro-batches of b, megaclip.accumulation): CatLIP's per-sample loss runs per
micro-batch, so its activations are one micro-batch's. The contrastive losses run GradCache: the loss
over the rank's batch K = k·b (the terms above with b = K) runs alone next to the cached features of
the K samples (2·K·o·c; with fusion also their image tokens, text states and token ids), then the
towers run one micro-batch at a time next to the features and their gradients:
    activations = copies + max(cached + loss(K) + loss backward(K), 2·cached + towers' peak of one b)
(matched to live bytes within 1.2 % on CPU, with either side the peak).
The fusion terms (model.fusion) are counted with the loss, as an estimate (``_fusion``).
CatLIP's loss keeps the multi-hot targets 4·b·C and the rank's logits in fp32 4·b·C/t (computed in the
model dtype and cast, the cast kept); its backward adds their gradient twice over, 8·b·C/t; then the
head's backward holds, with those freed, the logits' gradient b·C·c/t and the head's weight and bias
gradients (o·C + C)·c/t (+4 bytes per weight element under autocast, the fp32 cast), counted here as
the loss's backward where they are more.
Autocast also keeps a bf16 copy of every matmul weight and bias: 2 bytes per element.
The text tower's backward runs first (computed later, its autograd nodes have higher sequence
numbers), with the vision tower still whole, so
    activations = copies + max(vision + text + loss + loss backward, vision + text's layer backward,
                               vision's layer backward)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Tuple

from megaclip.data.synset_vocab import planned_class_count
from megaclip.memory_parameters import fusion_layer_count, parameter_shapes, uses_megatron_layers
from megaclip.model.parallel import padded_vocab_size
from megaclip.model.regularisers import kept_patch_count
from megaclip.objectives import per_sample, requirements

if TYPE_CHECKING:  # megaclip.memory imports this module
    from megaclip.memory import Checkpointing, Layout


_ACTIVATION_TENSORS = {"gelu": 2, "quick_gelu": 3}  # ffn-sized tensors an MLP keeps


@dataclass(frozen=True)
class Activations:
    vision: int  # kept by the vision tower at the end of the forward
    text: int
    loss: int
    peak: int  # the most alive at once in forward and backward, autocast's weight copies included


@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of each kind of activation (see the module docstring: c, r, m)."""
    compute: int
    residual: int
    linear: int


def bytes_per_element(model_cfg, layout: Layout) -> _Bytes:
    c = 2 if layout.precision == "bf16" else 4
    if not layout.autocast:
        return _Bytes(c, c, c)
    megatron_linears = uses_megatron_layers(model_cfg, layout.tp) and not layout.sequence_parallel
    return _Bytes(c, 4, 4 if megatron_linears else c)


def sequence_length(tower, vision: bool, multiple: int = 1) -> int:
    """Tokens per sample; the text tower pads its context to a multiple of tp for sequence parallelism
    (``multiple``)."""
    if vision:
        return tower.class_token_length + (tower.img_h // tower.patch_dim) * (tower.img_w // tower.patch_dim)
    return math.ceil(tower.encoder_seq_length / multiple) * multiple


def _layer(tower, tokens: int, layout: Layout, e: _Bytes) -> Tuple[int, int, int]:
    """(layer input, full layer, backward working set) in bytes on one rank."""
    h, f, n, t = tower.hidden_size, tower.ffn_hidden_size, tower.num_attention_heads, layout.tp
    q = t if layout.sequence_parallel else 1
    layer_input = tokens * h * e.residual // q
    outside = 2 * layer_input + 2 * tokens * h * e.linear + 16 * tokens // q
    if tower.hidden_dropout > 0:
        outside += 2 * tokens * h // q
    inside = tokens * (4 * h * e.compute + 4 * n + _ACTIVATION_TENSORS[tower.activation] * f * e.compute) // t
    # The MLP's backward: proj's input and weight gradients, next to the residual stream's gradient
    # (and, under sequence parallelism, proj's output gradient all-gathered to the whole sequence). By
    # the time GELU's and attention's backward allocate, tensors as large have been freed.
    weight_grad = f * h * (e.compute + (4 if layout.autocast else 0))  # autocast casts it to fp32 too
    working = (tokens * f * e.compute + weight_grad) // t + layer_input
    if layout.sequence_parallel:
        working += tokens * h * e.compute
    return layer_input, outside + inside, working


def trained_sequence(tower, vision: bool, multiple: int = 1) -> int:
    """Tokens per sample in training: the vision tower's class tokens + the patches that patch dropout
    keeps (a count that divides by ``multiple``, tp under sequence parallelism), else ``sequence_length``'s."""
    rate = tower.get("drop_patch_rate", 0.0) if vision else 0.0
    if not rate:
        return sequence_length(tower, vision, multiple)
    k = tower.class_token_length
    return k + kept_patch_count(sequence_length(tower, vision) - k, rate, k, multiple)


def tower_bytes(tower, output_dim: int, checkpointing: Checkpointing, layout: Layout, e: _Bytes,
           vision: bool) -> Tuple[int, int]:
    """(bytes kept at the end of the forward, bytes alive at the backward's peak in the layers, when the
    head (final LN, pooling, projection) is freed)."""
    b, h = layout.micro_batch, tower.hidden_size
    padding = layout.tp if layout.sequence_parallel else 1
    sequence = trained_sequence(tower, vision, padding)
    layer_input, full, working = _layer(tower, sequence * b, layout, e)
    inputs, fulls = checkpointing.kept(tower.num_layers)
    layers = inputs * layer_input + fulls * full
    backward = max(i * layer_input + n * full for i, n in checkpointing.in_backward(tower.num_layers)) + working
    tokens = (sequence if vision else sequence_length(tower, vision)) * b  # before and after the layers: unpadded and whole
    pooled = b * h * e.compute
    if vision:
        start = b * tower.num_channels * tower.img_h * tower.img_w * e.compute + tokens * h * e.residual + 8 * tokens
        if sequence < sequence_length(tower, vision):  # patch dropout's gather keeps what it picks from, and the indices
            start += sequence_length(tower, vision) * b * h * e.residual + 8 * b * (sequence - tower.class_token_length)
        # x[:, 0] is a view: the matmul saving it keeps all of ln_post's output, unless autocast saves
        # a bf16 copy instead or global average pooling makes a new tensor.
        if not (layout.autocast or tower.global_average_pool):
            pooled = tokens * h * e.residual
    else:
        start = 8 * tokens  # token ids (int64)
    head = tokens * h * e.residual + 8 * tokens + pooled + b * output_dim * e.compute
    return start + layers + head, start + backward


def _loss(model_cfg, layout: Layout) -> Tuple[int, int]:
    """(bytes the loss keeps, bytes its backward adds), fp32."""
    b, o = layout.micro_batch, model_cfg.output_dim
    if model_cfg.loss == "catlip":
        classes, local = planned_class_count(model_cfg), planned_class_count(model_cfg) // layout.tp
        kept = 4 * b * classes + 4 * b * local
        c = bytes_per_element(model_cfg, layout).compute
        head_backward = b * local * c + local * o * (c + (4 if layout.autocast else 0)) + local * c
        return kept, max(8 * b * local, head_backward - kept)
    block = model_cfg.get("loss_block_size", 0)  # configs saved before the key have none
    if model_cfg.loss == "siglip":
        tile = min(block or b, b)
        return 2 * b * o * 4, 2 * b * o * 4 + 6 * tile * tile * 4 + min(layout.dp - 1, 2) * 4 * b * o * 4
    samples = layout.dp * layout.micro_batch
    rows = layout.micro_batch if model_cfg.local_loss else samples
    features = 2 * samples * o * 4
    if block:  # log-sum-exps instead of logits
        tile = min(block, samples)
        return features + 2 * rows * 4, features + 2 * rows * o * 4 + 3 * tile * tile * 4
    return features + 2 * rows * samples * 4, 2 * rows * samples * 4


def _grad_cache(model_cfg, layout: Layout) -> bool:
    """Accumulation by cached features (megaclip.accumulation): more than one micro-batch of a contrastive loss."""
    return layout.micro_batches > 1 and not per_sample(model_cfg)


def _loss_layout(model_cfg, layout: Layout) -> Layout:
    """The layout the loss sees: under GradCache its batch is the rank's whole batch."""
    if not _grad_cache(model_cfg, layout):
        return layout
    return layout.replace(micro_batch=layout.micro_batch * layout.micro_batches, micro_batches=1)


def _cached_features(model_cfg, layout: Layout, e: _Bytes) -> int:
    """GradCache's features of the rank's batch, in the model's dtype (their gradients as many again):
    both embeddings, and for fusion the image tokens, the text states and the token ids."""
    batch = layout.micro_batch * layout.micro_batches
    cached = 2 * batch * model_cfg.output_dim * e.compute
    if fusion_layer_count(model_cfg):
        v, t = model_cfg.vision, model_cfg.text
        cached += batch * (trained_sequence(v, True) * v.hidden_size + t.encoder_seq_length * t.hidden_size) * e.compute
        cached += 8 * batch * t.encoder_seq_length
    return cached


def _fusion(model_cfg, layout: Layout, e: _Bytes) -> Tuple[int, int]:
    """(bytes the fusion terms keep, bytes their backward adds): an estimate from the code, not matched
    to live tensors. P image-caption pairs go through the fusion layers, 3b for ITM (positives, both
    sides' negatives) + b for captioning; each layer keeps what a text layer keeps for P·s tokens plus
    its cross-attention's (LN input and output, q, attention output, log-sum-exp, and k, v and the
    kv input over the P·s_v image tokens); before the layers the pairs' image tokens and their
    projection, P·s_v·(h_v + h); the captioning logits 2·c/4·s·V/t fp32 for c captions (kept and their
    softmax). Under GradCache the terms run a micro-batch of b rows at a time, each chunk checkpointed
    (megaclip.fusion_objective): one chunk's activations at most (b pairs, b captions' logits), beside
    the negatives fetched for the rank's batch, its b·k image tokens and text states. Before the layers,
    the hard negatives are drawn from r × N similarities (r: loss_block_size rows, or the rank's batch; N
    the global batch): three fp32 and three bool temporaries of that shape at once, gone by the time the
    layers run, so counted with the transient bytes."""
    if not fusion_layer_count(model_cfg):
        return 0, 0
    from megaclip.model.fusion import fusion_config

    f, b, t = fusion_config(model_cfg), layout.micro_batch, layout.tp
    itm, lm = bool(model_cfg.fusion.itm_weight), bool(model_cfg.fusion.lm_weight)
    padding = layout.tp if layout.sequence_parallel else 1
    s, s_v, h = sequence_length(f, vision=False, multiple=padding), sequence_length(model_cfg.vision, vision=True), f.hidden_size
    chunked = _grad_cache(model_cfg, layout)
    pairs = b if chunked else b * (3 * itm + lm)
    negatives = itm * chunked * b * layout.micro_batches * (s_v * model_cfg.vision.hidden_size + s * model_cfg.text.hidden_size) * e.compute
    tokens, image_tokens = pairs * s, pairs * s_v
    _, full, working = _layer(f, tokens, layout, e)
    q = t if layout.sequence_parallel else 1
    cross = (2 * tokens * h * e.residual // q + 8 * tokens // q + tokens * h * e.linear + image_tokens * h * e.linear
             + (2 * tokens * h + 2 * image_tokens * h) * e.compute // t + 4 * tokens * f.num_attention_heads // t)
    start = image_tokens * ((0 if chunked else model_cfg.vision.hidden_size * e.residual) + h * e.compute)  # chunks: views
    logits = 2 * 4 * b * s * padded_vocab_size(model_cfg.text.vocab_size, t) // t if lm else 0
    rank_batch = b * layout.micro_batches
    drawn_rows = min(model_cfg.get("loss_block_size", 0) or rank_batch, rank_batch)
    draw = itm * drawn_rows * layout.dp * rank_batch * (3 * 4 + 3)
    return negatives + start + f.num_layers * (full + cross) + logits, max(working + logits, draw)


def objective_bytes(model_cfg, layout: Layout, e: _Bytes) -> Tuple[int, int]:
    """(bytes the loss and the fusion terms keep, bytes their backward adds), over the batch the loss sees."""
    return tuple(a + b for a, b in zip(_loss(model_cfg, _loss_layout(model_cfg, layout)), _fusion(model_cfg, layout, e)))


def activation_bytes(model_cfg, layout: Layout) -> Activations:
    e = bytes_per_element(model_cfg, layout)
    vision = tower_bytes(model_cfg.vision, model_cfg.output_dim, layout.vision_checkpointing, layout, e, vision=True)
    text = _text_tower(model_cfg, layout.text_checkpointing, layout, e)
    loss = objective_bytes(model_cfg, layout, e)
    return Activations(vision[0], text[0], loss[0], step_peak(model_cfg, layout, vision, text, loss))


def step_peak(model_cfg, layout: Layout, vision: Tuple[int, int], text: Tuple[int, int], loss: Tuple[int, int]) -> int:
    """``_peak`` of a micro-batch; under GradCache the loss runs alone over the cached features (pass 2),
    then the towers a micro-batch at a time beside the features and their gradients (pass 3)."""
    copies = _autocast_copies(model_cfg, layout)
    if not _grad_cache(model_cfg, layout):
        return _peak(copies, vision, text, loss)
    cached = _cached_features(model_cfg, layout, bytes_per_element(model_cfg, layout))
    return copies + max(cached + loss[0] + loss[1], 2 * cached + _peak(0, vision, text, (0, 0)))


def built_towers(model_cfg) -> Tuple[str, ...]:
    """The towers the objective builds, by config section."""
    return ("vision", "text") if "text" in requirements(model_cfg).towers else ("vision",)


def _text_tower(model_cfg, checkpointing: Checkpointing, layout: Layout, e: _Bytes) -> Tuple[int, int]:
    if "text" not in built_towers(model_cfg):
        return 0, 0
    return tower_bytes(model_cfg.text, model_cfg.output_dim, checkpointing, layout, e, vision=False)


def _peak(copies: int, vision: Tuple[int, int], text: Tuple[int, int], loss: Tuple[int, int]) -> int:
    """The most alive at once from each part's (kept, in backward) bytes. The text tower's backward runs
    first (its autograd nodes are younger), with the vision tower still whole."""
    return copies + max(vision[0] + text[0] + loss[0] + loss[1], vision[0] + text[1], vision[1])


def _autocast_copies(model_cfg, layout: Layout) -> int:
    if not layout.autocast:
        return 0
    return 2 * sum(math.prod(shape) for name, shape in parameter_shapes(model_cfg, layout.tp).items()
                   if _is_matmul_operand(name))


def _is_matmul_operand(name: str) -> bool:
    """Parameters autocast copies to bf16: linear, conv and projection weights and biases."""
    return any(part in name for part in (".attn.", ".mlp.", "conv1", "visual.proj", "text_projection", "catlip_head",
                                         "image_to_text", "itm_head"))


"""Per-GPU memory of a megaclip training run: parameters, gradients, optimizer state, activations.

Everything is per GPU, i.e. per tensor-parallel (TP) rank, in bytes. Notation: t TP size, d data-
parallel (DP) size, b micro batch; per tower L layers, h width, f ffn width, n heads, s tokens (vision:
class tokens + patches; text: the context, padded to a multiple of t under sequence parallelism),
T = s·b tokens per micro batch; o output dim; q = t with sequence parallelism, else 1.

Parameters, counted exactly by ``parameter_shapes`` (``CLIPModel``'s names and shapes on one TP rank).
qkv and fc (weight and bias), the weights of the two proj row linears and the token embedding (rows
padded to a multiple of 128·t) are split over t; everything else is replicated:
    layer    4h (ln_1, ln_2) + (3h² + 3h)/t + h²/t + h + (fh + f)/t + fh/t + h
    vision   conv1 3·p²·h + class k·h + positions (k + patches)·h + ln_pre, ln_post 4h + proj h·o
    text     tokens V_pad·h/t + positions ctx·h + ln_final 2h + projection h·o
    the objective's scalars: logit_scale 1 (clip), + logit_bias 1 (siglip)
    CatLIP   no text tower; its head, a column linear over its C classes: (o·C + C)/t
    fusion   per layer a text-width layer + cross-attention 2h + (h² + h)/t + (2h² + 2h)/t + h²/t + h;
             image_to_text h_v·h + h, ln_final 2h, itm_head 2h + 2 (model.fusion)
With n_local elements on a rank and weights of w bytes (2 under bf16 O2, where the objective's scalars
stay fp32; else 4):
    params      n_local·w
    grads       4·Σ n_i        the fp32 gradient buffers of the buckets i (megaclip.optim.buckets: one
                               kind of parameter each, at most model.optim.bucket_size_mb, taken backwards);
                               distributed_fused_adam pads each n_i to a multiple of d. bf16 gradients
                               are added into them as backward makes them, one tensor at a time
    optimizer   fused_adam: 8·n_local (torch AdamW's two moments, fp32); with O2 12·n_local (fp32
                master weights + two moments); distributed_fused_adam: 12·Σ ceil(n_i / d) over its
                buckets (kinds: dtype, weight decay, tensor-parallel; only megatron-core's layers,
                used at t > 1, mark parameters tensor-parallel)
    step        what finishing the gradients and stepping allocates, after the activations are freed:
                next to nothing: the DP reductions run in place in the fp32 buffers (a reduce-scatter
                and the all-gather after the update read and write this rank's shard of the same
                buffer, as NCCL allows) and the norm squares no copy.

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
(model.loss_block_size l) it keeps the features (twice for local_loss: its columns rolled) and the
per-row log-sum-exps 2·R·4; its backward adds the feature gradients 2·N·o·4 + 2·R·o·4 and one block's
logits, probabilities and product 3·l²·4 (an estimate: within 10 % of the live bytes on CPU).
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
    total = params + grads + optimizer + max(activations, step)
Not counted: the CUDA context, NCCL buffers and allocator fragmentation (leave headroom). A CPU run's
live tensors match this to 0.2 % (activations: fp32 and O2; TP 1 and 2, with and without sequence
parallelism and checkpointing; the step: all but the sharded path, where gloo's reduce-scatter copies
its input); what CPU cannot show is CUDA's own: fp32 LN statistics and bool dropout masks for any
input dtype, and autocast, whose CPU rules differ.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megaclip.data.synset_vocab import planned_class_count
from megaclip.model.parallel import padded_vocab_size
from megaclip.model.regularisers import kept_patch_count
from megaclip.model.state import partition_dim
from megaclip.objectives import per_sample, requirements
from megaclip.precision import FP32_SCALARS
from megaclip.optim.adamw import no_weight_decay
from megaclip.optim.buckets import bucket_layout

GiB = 2 ** 30
OPTIMIZERS = ("fused_adam", "distributed_fused_adam")
_ACTIVATION_TENSORS = {"gelu": 2, "quick_gelu": 3}  # ffn-sized tensors an MLP keeps


@dataclass(frozen=True)
class Checkpointing:
    """Full activation checkpointing of one tower (megatron's meaning): ``uniform`` recomputes every
    chunk of ``num_layers`` layers from its input, ``block`` checkpoints the first ``num_layers``
    layers only; ``method=None`` keeps everything."""
    method: Optional[str] = None
    num_layers: int = 1

    @classmethod
    def of_tower(cls, tower) -> "Checkpointing":
        method = tower.activations_checkpoint_method if tower.activations_checkpoint_granularity == "full" else None
        return cls(method, tower.activations_checkpoint_num_layers)

    def kept(self, num_layers: int) -> Tuple[int, int]:
        """(layer inputs, full layers) kept at the end of the forward."""
        k = min(self.num_layers, num_layers)
        if self.method == "uniform":
            return math.ceil(num_layers / k), 0
        if self.method == "block":
            return k, num_layers - k
        return 0, num_layers

    def in_backward(self, num_layers: int) -> List[Tuple[int, int]]:
        """(layer inputs, full layers) alive as the backward reaches each recomputed chunk, or the kept
        layers: the earlier chunks' inputs wait; a chunk's own input is its first layer's."""
        k = min(self.num_layers, num_layers)
        if self.method == "uniform":
            return [(j, min(k, num_layers - start)) for j, start in enumerate(range(0, num_layers, k))]
        if self.method == "block":
            return [(k, num_layers - k), (k - 1, 1)]
        return [(0, num_layers)]


@dataclass(frozen=True)
class Layout:
    """How a run is split and trained: everything the planner needs besides the model's shape."""
    tp: int = 1
    dp: int = 1
    micro_batch: int = 1
    micro_batches: int = 1  # per optimizer step (gradient accumulation): the rank's batch is their product
    precision: str = "bf16"  # 32 | bf16
    o2: bool = False  # bf16 weights, fp32 master weights in the optimizer
    optimizer: str = "fused_adam"
    sequence_parallel: bool = False
    vision_checkpointing: Checkpointing = Checkpointing()
    text_checkpointing: Checkpointing = Checkpointing()

    @classmethod
    def from_config(cls, cfg, dp: int = 1) -> "Layout":
        m = cfg.model
        micro = m.micro_batch_size or m.global_batch_size // dp
        return cls(tp=m.tensor_model_parallel_size, dp=dp, micro_batch=micro, micro_batches=max(1, m.global_batch_size // dp // micro),
                   precision=cfg.trainer.precision, o2=m.megatron_amp_O2, optimizer=m.optim.name,
                   sequence_parallel=m.sequence_parallel, vision_checkpointing=Checkpointing.of_tower(m.vision),
                   text_checkpointing=Checkpointing.of_tower(m.text))

    @property
    def bf16_weights(self) -> bool:
        return self.precision == "bf16" and self.o2

    @property
    def autocast(self) -> bool:
        return self.precision == "bf16" and not self.o2

    def replace(self, **changes) -> "Layout":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MemoryPlan:
    params: int
    grads: int
    optimizer_state: int
    activations: int  # the forward and backward's peak
    optimizer_step: int  # the step's transients, when the activations are gone

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_state + max(self.activations, self.optimizer_step)


@dataclass(frozen=True)
class Activations:
    vision: int  # kept by the vision tower at the end of the forward
    text: int
    loss: int
    peak: int  # the most alive at once in forward and backward, autocast's weight copies included


# ---------------------------------------------------------------- parameters


def parameter_shapes(model_cfg, tp: int) -> Dict[str, Tuple[int, ...]]:
    """``CLIPModel(model_cfg).named_parameters()``'s names and shapes on one rank at TP size ``tp``."""
    v, t = model_cfg.vision, model_cfg.text
    patches = (v.img_h // v.patch_dim) * (v.img_w // v.patch_dim)
    # a module's own parameters come before its submodules' in named_parameters
    shapes = {name: () for name in requirements(model_cfg).scalars}
    shapes.update({
        "visual.class_embedding": (v.class_token_length, v.hidden_size),
        "visual.positional_embedding": (v.class_token_length + patches, v.hidden_size),
        "visual.proj": (v.hidden_size, model_cfg.output_dim),
        "visual.conv1.weight": (v.hidden_size, v.num_channels, v.patch_dim, v.patch_dim),
        **_layer_norm("visual.ln_pre", v.hidden_size),
        **_transformer_shapes("visual.transformer", v, tp),
        **_layer_norm("visual.ln_post", v.hidden_size),
    })
    if "text" in requirements(model_cfg).towers:
        shapes.update({
            "text.positional_embedding": (t.encoder_seq_length, t.hidden_size),
            "text.text_projection": (t.hidden_size, model_cfg.output_dim),
            "text.token_embedding.weight": (padded_vocab_size(t.vocab_size, tp) // tp, t.hidden_size),
            **_transformer_shapes("text.transformer", t, tp),
            **_layer_norm("text.ln_final", t.hidden_size),
        })
    if model_cfg.loss == "catlip":
        classes = planned_class_count(model_cfg) // tp
        shapes.update({"catlip_head.weight": (classes, model_cfg.output_dim), "catlip_head.bias": (classes,)})
    if _fusion_layers(model_cfg):
        shapes.update(_fusion_shapes(model_cfg, tp))
    return shapes


def _fusion_layers(model_cfg) -> int:
    fusion = model_cfg.get("fusion")  # configs saved before the key existed have none
    return fusion.num_layers if fusion is not None else 0


def _fusion_shapes(model_cfg, tp: int) -> Dict[str, Tuple[int, ...]]:
    """The fusion layers (megaclip.model.fusion): a text-width layer plus cross-attention (q and kv
    column linears, a row proj, its LayerNorm), the image-token projection and the match head."""
    from megaclip.model.fusion import fusion_config

    f = fusion_config(model_cfg)
    w = f.hidden_size
    shapes = {"fusion.image_to_text.weight": (w, model_cfg.vision.hidden_size), "fusion.image_to_text.bias": (w,)}
    for name, shape in _transformer_shapes("fusion.transformer", f, tp).items():
        shapes[name] = shape
        if name.endswith("attn.proj.bias"):  # after self-attention: the cross-attention's
            p = name[:-len("attn.proj.bias")]
            shapes.update({**_layer_norm(f"{p}ln_cross", w),
                           f"{p}cross_attn.q.weight": (w // tp, w), f"{p}cross_attn.q.bias": (w // tp,),
                           f"{p}cross_attn.kv.weight": (2 * w // tp, w), f"{p}cross_attn.kv.bias": (2 * w // tp,),
                           f"{p}cross_attn.proj.weight": (w, w // tp), f"{p}cross_attn.proj.bias": (w,)})
    return {**shapes, **_layer_norm("fusion.ln_final", w), "fusion.itm_head.weight": (2, w), "fusion.itm_head.bias": (2,)}


def _layer_norm(prefix: str, width: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _transformer_shapes(prefix: str, tower, tp: int) -> Dict[str, Tuple[int, ...]]:
    w, f = tower.hidden_size, tower.ffn_hidden_size
    shapes = {}
    for i in range(tower.num_layers):
        p = f"{prefix}.layers.{i}"
        shapes.update({
            **_layer_norm(f"{p}.ln_1", w),
            f"{p}.attn.qkv.weight": (3 * w // tp, w), f"{p}.attn.qkv.bias": (3 * w // tp,),
            f"{p}.attn.proj.weight": (w, w // tp), f"{p}.attn.proj.bias": (w,),
            **_layer_norm(f"{p}.ln_2", w),
            f"{p}.mlp.fc.weight": (f // tp, w), f"{p}.mlp.fc.bias": (f // tp,),
            f"{p}.mlp.proj.weight": (w, f // tp), f"{p}.mlp.proj.bias": (w,),
        })
    return shapes


def weight_bytes(name: str, layout: Layout) -> int:
    """Bytes per element of parameter ``name``: O2 casts the model to bf16 but the objective's scalars."""
    return 2 if layout.bf16_weights and name not in FP32_SCALARS else 4


def parameter_buckets(model_cfg, layout: Layout) -> List[int]:
    """Elements per gradient bucket, as megaclip.optim.buckets lays them out: one kind (bytes per
    element, weight decay, tensor-parallel) per bucket, at most model.optim.bucket_size_mb of fp32
    gradient, the parameters taken backwards. Only megatron-core's layers mark parameters tensor-
    parallel; TP=1's plain nn.Linear and nn.Embedding do not."""
    marked = _megatron_layers(model_cfg, layout.tp)
    kinds_and_sizes = []
    for name, shape in parameter_shapes(model_cfg, layout.tp).items():
        decay = not no_weight_decay(name, torch.empty(shape, device="meta"))
        kinds_and_sizes.append(((weight_bytes(name, layout), decay, marked and partition_dim(name) is not None),
                                math.prod(shape)))
    cap = max(1, int(model_cfg.optim.bucket_size_mb * 2 ** 20 / 4))
    return [sum(kinds_and_sizes[i][1] for i in bucket) for bucket in bucket_layout(kinds_and_sizes, cap)]


def _megatron_layers(model_cfg, tp: int) -> bool:
    return model_cfg.linear_impl == "megatron" or (model_cfg.linear_impl == "auto" and tp > 1)


def optimizer_state_bytes(layout: Layout, bucket_elements: Iterable[int]) -> int:
    """Adam's state for parameters in flat buckets of ``bucket_elements`` (one entry per bucket; only
    distributed_fused_adam, which shards each bucket over DP, cares how they are split)."""
    elements = list(bucket_elements)
    if layout.optimizer == "distributed_fused_adam":
        return 12 * sum(math.ceil(n / layout.dp) for n in elements)
    return (12 if layout.bf16_weights else 8) * sum(elements)


def gradient_bytes(layout: Layout, bucket_elements: Iterable[int]) -> int:
    """The fp32 gradient buffers, each bucket padded to a multiple of the DP size when sharded."""
    shards = layout.dp if layout.optimizer == "distributed_fused_adam" else 1
    return 4 * sum(math.ceil(n / shards) * shards for n in bucket_elements)


def optimizer_step_bytes(bucket_elements: Iterable[int]) -> int:
    """What reducing the gradients and stepping allocates on top of the state, once the activations
    are freed: the collectives run in place in the buffers, the norm squares no copy, so only one fp32
    norm per bucket and a few scalars."""
    return 4 * len(list(bucket_elements)) + 64


# ---------------------------------------------------------------- activations


@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of each kind of activation (see the module docstring: c, r, m)."""
    compute: int
    residual: int
    linear: int


def _activation_bytes_per_element(model_cfg, layout: Layout) -> _Bytes:
    c = 2 if layout.precision == "bf16" else 4
    if not layout.autocast:
        return _Bytes(c, c, c)
    megatron_linears = _megatron_layers(model_cfg, layout.tp) and not layout.sequence_parallel
    return _Bytes(c, 4, 4 if megatron_linears else c)


def _sequence(tower, vision: bool, multiple: int = 1) -> int:
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


def _trained_sequence(tower, vision: bool, multiple: int = 1) -> int:
    """Tokens per sample in training: the vision tower's class tokens + the patches that patch dropout
    keeps (a count that divides by ``multiple``, tp under sequence parallelism), else ``_sequence``'s."""
    rate = tower.get("drop_patch_rate", 0.0) if vision else 0.0
    if not rate:
        return _sequence(tower, vision, multiple)
    k = tower.class_token_length
    return k + kept_patch_count(_sequence(tower, vision) - k, rate, k, multiple)


def _tower(tower, output_dim: int, checkpointing: Checkpointing, layout: Layout, e: _Bytes,
           vision: bool) -> Tuple[int, int]:
    """(bytes kept at the end of the forward, bytes alive at the backward's peak in the layers, when the
    head (final LN, pooling, projection) is freed)."""
    b, h = layout.micro_batch, tower.hidden_size
    padding = layout.tp if layout.sequence_parallel else 1
    sequence = _trained_sequence(tower, vision, padding)
    layer_input, full, working = _layer(tower, sequence * b, layout, e)
    inputs, fulls = checkpointing.kept(tower.num_layers)
    layers = inputs * layer_input + fulls * full
    backward = max(i * layer_input + n * full for i, n in checkpointing.in_backward(tower.num_layers)) + working
    tokens = (sequence if vision else _sequence(tower, vision)) * b  # before and after the layers: unpadded and whole
    pooled = b * h * e.compute
    if vision:
        start = b * tower.num_channels * tower.img_h * tower.img_w * e.compute + tokens * h * e.residual + 8 * tokens
        if sequence < _sequence(tower, vision):  # patch dropout's gather keeps what it picks from, and the indices
            start += _sequence(tower, vision) * b * h * e.residual + 8 * b * (sequence - tower.class_token_length)
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
        c = _activation_bytes_per_element(model_cfg, layout).compute
        head_backward = b * local * c + local * o * (c + (4 if layout.autocast else 0)) + local * c
        return kept, max(8 * b * local, head_backward - kept)
    block = model_cfg.get("loss_block_size", 0)  # configs saved before the key have none
    if model_cfg.loss == "siglip":
        tile = min(block or b, b)
        return 2 * b * o * 4, 2 * b * o * 4 + 6 * tile * tile * 4 + min(layout.dp - 1, 2) * 4 * b * o * 4
    samples = layout.dp * layout.micro_batch
    rows = layout.micro_batch if model_cfg.local_loss else samples
    features = 2 * samples * o * 4
    if block:  # per-row log-sum-exps instead of logits (the local loss keeps its columns rolled, a copy)
        tile = min(block, samples)
        kept = features * (2 if model_cfg.local_loss else 1) + 2 * rows * 4
        return kept, features + 2 * rows * o * 4 + 3 * tile * tile * 4
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
    if _fusion_layers(model_cfg):
        v, t = model_cfg.vision, model_cfg.text
        cached += batch * (_trained_sequence(v, True) * v.hidden_size + t.encoder_seq_length * t.hidden_size) * e.compute
        cached += 8 * batch * t.encoder_seq_length
    return cached


def _fusion(model_cfg, layout: Layout, e: _Bytes) -> Tuple[int, int]:
    """(bytes the fusion terms keep, bytes their backward adds): an estimate from the code, not matched
    to live tensors. P image-caption pairs go through the fusion layers, 3b for ITM (positives, both
    sides' negatives) + b for captioning; each layer keeps what a text layer keeps for P·s tokens plus
    its cross-attention's (LN input and output, q, attention output, log-sum-exp, and k, v and the
    kv input over the P·s_v image tokens); before the layers the pairs' image tokens and their
    projection, P·s_v·(h_v + h); the captioning logits 2·P/4·s·V/t fp32 (kept and their softmax)."""
    if not _fusion_layers(model_cfg):
        return 0, 0
    from megaclip.model.fusion import fusion_config

    f, b, t = fusion_config(model_cfg), layout.micro_batch, layout.tp
    pairs = b * ((3 if model_cfg.fusion.itm_weight else 0) + (1 if model_cfg.fusion.lm_weight else 0))
    padding = layout.tp if layout.sequence_parallel else 1
    s, s_v, h = _sequence(f, vision=False, multiple=padding), _sequence(model_cfg.vision, vision=True), f.hidden_size
    tokens, image_tokens = pairs * s, pairs * s_v
    _, full, working = _layer(f, tokens, layout, e)
    q = t if layout.sequence_parallel else 1
    cross = (2 * tokens * h * e.residual // q + 8 * tokens // q + tokens * h * e.linear + image_tokens * h * e.linear
             + (2 * tokens * h + 2 * image_tokens * h) * e.compute // t + 4 * tokens * f.num_attention_heads // t)
    start = image_tokens * (model_cfg.vision.hidden_size * e.residual + h * e.compute)
    logits = 2 * 4 * b * s * padded_vocab_size(model_cfg.text.vocab_size, t) // t if model_cfg.fusion.lm_weight else 0
    return start + f.num_layers * (full + cross) + logits, working + logits


def activation_bytes(model_cfg, layout: Layout) -> Activations:
    e = _activation_bytes_per_element(model_cfg, layout)
    vision = _tower(model_cfg.vision, model_cfg.output_dim, layout.vision_checkpointing, layout, e, vision=True)
    text = _text_tower(model_cfg, layout.text_checkpointing, layout, e)
    loss_layout = _loss_layout(model_cfg, layout)
    loss = tuple(a + b for a, b in zip(_loss(model_cfg, loss_layout), _fusion(model_cfg, loss_layout, e)))
    return Activations(vision[0], text[0], loss[0], _step_peak(model_cfg, layout, vision, text, loss))


def _step_peak(model_cfg, layout: Layout, vision: Tuple[int, int], text: Tuple[int, int], loss: Tuple[int, int]) -> int:
    """``_peak`` of a micro-batch; under GradCache the loss runs alone over the cached features (pass 2),
    then the towers a micro-batch at a time beside the features and their gradients (pass 3)."""
    copies = _autocast_copies(model_cfg, layout)
    if not _grad_cache(model_cfg, layout):
        return _peak(copies, vision, text, loss)
    cached = _cached_features(model_cfg, layout, _activation_bytes_per_element(model_cfg, layout))
    return copies + max(cached + loss[0] + loss[1], 2 * cached + _peak(0, vision, text, (0, 0)))


def _towers(model_cfg) -> Tuple[str, ...]:
    """The towers the objective builds, by config section."""
    return ("vision", "text") if "text" in requirements(model_cfg).towers else ("vision",)


def _text_tower(model_cfg, checkpointing: Checkpointing, layout: Layout, e: _Bytes) -> Tuple[int, int]:
    if "text" not in _towers(model_cfg):
        return 0, 0
    return _tower(model_cfg.text, model_cfg.output_dim, checkpointing, layout, e, vision=False)


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


# ---------------------------------------------------------------- plans


def layout_problem(model_cfg, layout: Layout) -> Optional[str]:
    """Why ``layout`` cannot run this model (a few words), or None."""
    for name in _towers(model_cfg):
        tower = model_cfg[name]
        if tower.num_attention_heads % layout.tp:
            return f"{tower.num_attention_heads} {name} heads"
        if tower.ffn_hidden_size % layout.tp:
            return f"{name} ffn {tower.ffn_hidden_size}"
    if model_cfg.loss == "catlip" and planned_class_count(model_cfg) % layout.tp:
        return f"{planned_class_count(model_cfg)} CatLIP classes"
    if layout.sequence_parallel:
        if layout.tp == 1:
            return "sequence parallel needs tp > 1"
        seq = _sequence(model_cfg.vision, vision=True)
        if seq % layout.tp:
            return f"vision sequence {seq}"
    return None


def plan_memory(cfg, layout: Layout, bucket_elements: Optional[Iterable[int]] = None) -> MemoryPlan:
    """Per-GPU bytes of a run of config ``cfg`` laid out as ``layout``. ``bucket_elements``: the real
    optimizer buckets' sizes, when known; by default megaclip's, counted from the model's shape."""
    m = cfg.model
    buckets = list(parameter_buckets(m, layout) if bucket_elements is None else bucket_elements)
    shapes = parameter_shapes(m, layout.tp)
    weights = sum(math.prod(shape) * weight_bytes(name, layout) for name, shape in shapes.items())
    return MemoryPlan(params=weights, grads=gradient_bytes(layout, buckets), optimizer_state=optimizer_state_bytes(layout, buckets),
                      activations=activation_bytes(m, layout).peak,
                      optimizer_step=optimizer_step_bytes(buckets))


@dataclass(frozen=True)
class Fit:
    layout: Layout
    plan: MemoryPlan
    recomputed: float  # share of the layers' forward FLOPs run twice
    fits: bool


def least_recompute_fit(cfg, layout: Layout, budget: int) -> Fit:
    """The checkpointing of each tower that keeps ``layout`` within ``budget`` bytes and recomputes the
    fewest layer FLOPs; if none does, the leanest (``fits`` False). A tower's options, by recompute:
    none, block k < L (block L recomputes more and keeps as much as block L - 1), then uniform k, which
    recomputes every layer but keeps only every k-th input."""
    m = cfg.model
    static = plan_memory(cfg, layout.replace(vision_checkpointing=Checkpointing(), text_checkpointing=Checkpointing()))
    e = _activation_bytes_per_element(m, layout)
    loss_layout = _loss_layout(m, layout)
    loss = tuple(a + b for a, b in zip(_loss(m, loss_layout), _fusion(m, loss_layout, e)))
    towers = {"text": [(Checkpointing(), 0, (0, 0))]}  # CatLIP builds no text tower
    for name in _towers(m):
        tower, layers = m[name], m[name].num_layers
        options = ([(Checkpointing(), 0)] + [(Checkpointing("block", k), k) for k in range(1, layers)]
                   + [(Checkpointing("uniform", k), layers) for k in range(1, layers + 1)])
        flops = _layer_flops(tower, layout, name == "vision")
        towers[name] = [(c, recomputed * flops, _tower(tower, m.output_dim, c, layout, e, name == "vision"))
                        for c, recomputed in options]
    total_flops = sum(_layer_flops(m[n], layout, n == "vision") * m[n].num_layers for n in _towers(m))

    def attempt(vision_option, text_option) -> Fit:
        (vision_ckpt, vision_flops, vision), (text_ckpt, text_flops, text) = vision_option, text_option
        plan = dataclasses.replace(static, activations=_step_peak(m, layout, vision, text, loss))
        trial = layout.replace(vision_checkpointing=vision_ckpt, text_checkpointing=text_ckpt)
        return Fit(trial, plan, (vision_flops + text_flops) / total_flops, plan.total <= budget)

    best = leanest = None
    for vision_option in towers["vision"]:
        for text_option in towers["text"]:
            fit = attempt(vision_option, text_option)
            if leanest is None or fit.plan.total < leanest.plan.total:
                leanest = fit
            if fit.fits:
                if best is None or fit.recomputed < best.recomputed:
                    best = fit
                break  # the text options further on recompute more
    return best or leanest


def _layer_flops(tower, layout: Layout, vision: bool) -> int:
    """Forward FLOPs of one layer for one micro batch in training: the four linears and the attention products."""
    h, f = tower.hidden_size, tower.ffn_hidden_size
    seq = _trained_sequence(tower, vision, layout.tp if layout.sequence_parallel else 1)
    return layout.micro_batch * seq * (8 * h * h + 4 * h * f + 4 * seq * h)

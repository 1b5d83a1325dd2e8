"""Per-GPU memory of a megaclip training run: parameters, gradients, optimizer state, activations.

Everything is per GPU, i.e. per tensor-parallel (TP) rank, in bytes. Notation: t TP size, d data-
parallel (DP) size, b micro batch; per tower L layers, h width, f ffn width, n heads, s tokens (vision:
class tokens + patches; text: the context, padded to a multiple of t under sequence parallelism),
T = s·b tokens per micro batch; o output dim; q = t with sequence parallelism, else 1.

The parameters, their gradients, the optimizer's state and its step are counted in
megaclip.memory_parameters, the activations of a step in megaclip.memory_activations; here they add
up, and the planner checks layouts and picks the checkpointing that fits:
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
from typing import Iterable, List, Optional, Tuple

from megaclip.data.synset_vocab import planned_class_count
from megaclip.memory_activations import (activation_bytes, built_towers, bytes_per_element, objective_bytes,
                                         sequence_length, step_peak, tower_bytes, trained_sequence)
from megaclip.memory_parameters import (gradient_bytes, optimizer_state_bytes, optimizer_step_bytes, parameter_buckets,
                                        parameter_shapes, weight_bytes)

GiB = 2 ** 30
OPTIMIZERS = ("fused_adam", "distributed_fused_adam")


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


def layout_problem(model_cfg, layout: Layout) -> Optional[str]:
    """Why ``layout`` cannot run this model (a few words), or None."""
    for name in built_towers(model_cfg):
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
        seq = sequence_length(model_cfg.vision, vision=True)
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
    e = bytes_per_element(m, layout)
    loss = objective_bytes(m, layout, e)
    towers = {"text": [(Checkpointing(), 0, (0, 0))]}  # CatLIP builds no text tower
    for name in built_towers(m):
        tower, layers = m[name], m[name].num_layers
        options = ([(Checkpointing(), 0)] + [(Checkpointing("block", k), k) for k in range(1, layers)]
                   + [(Checkpointing("uniform", k), layers) for k in range(1, layers + 1)])
        flops = _layer_flops(tower, layout, name == "vision")
        towers[name] = [(c, recomputed * flops, tower_bytes(tower, m.output_dim, c, layout, e, name == "vision"))
                        for c, recomputed in options]
    total_flops = sum(_layer_flops(m[n], layout, n == "vision") * m[n].num_layers for n in built_towers(m))

    def attempt(vision_option, text_option) -> Fit:
        (vision_ckpt, vision_flops, vision), (text_ckpt, text_flops, text) = vision_option, text_option
        plan = dataclasses.replace(static, activations=step_peak(m, layout, vision, text, loss))
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
    seq = trained_sequence(tower, vision, layout.tp if layout.sequence_parallel else 1)
    return layout.micro_batch * seq * (8 * h * h + 4 * h * f + 4 * seq * h)

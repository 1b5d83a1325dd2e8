"""open_clip's and megaclip's training steps side by side: ``tools/benchmark.py --vs-open-clip``.

One process, one device, the same architecture, batch and random data for every variant. Per compile
setting the variants are built, warmed up (compilation happens there), then timed in alternating
rounds of ``--steps`` steps, each round starting with another variant; a row's step time is the
median over rounds. Peak memory (CUDA only) is what a variant holds between steps plus the most its
own steps allocate on top, measured while the other variants' state is resident too.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmark import MegaclipStep, random_batch
from megaclip import distributed
from megaclip.config import load_config
from megaclip.config_checks import validate
from megaclip.convert import import_library
from megaclip.convert.open_clip import open_clip_overrides

MEGACLIP_CONFIGS = {"ViT-B-16": "clip_B16", "ViT-L-14": "clip_L14", "ViT-g-14": "clip_g14", "ViT-B-32": "clip_B32",
                    "tiny": "clip_tiny"}
TINY_OPEN_CLIP = {  # clip_tiny's shape, for a smoke test on CPU
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 4, "layers": 2},
}
GiB = 2 ** 30


# ---------------------------------------------------------------- the architecture and its FLOPs


def architectures(model: str, layers: Optional[int]):
    """open_clip's model config, the megaclip overrides that build the same architecture (open_clip's
    head counts and widths over megaclip's config of that size), and what they change in that config."""
    open_clip = import_library("open_clip")
    if model not in MEGACLIP_CONFIGS:
        raise SystemExit(f"--model must be one of {', '.join(MEGACLIP_CONFIGS)}, got {model}")
    oc = copy.deepcopy(TINY_OPEN_CLIP if model == "tiny" else open_clip.get_model_config(model))
    if layers:
        oc["vision_cfg"]["layers"] = oc["text_cfg"]["layers"] = layers
    base = load_config(MEGACLIP_CONFIGS[model])
    arch = list(_dotted(open_clip_overrides(oc), "model"))
    changed = [f"{key} {OmegaConf.select(base, key)} -> {value}" for key, value in arch
               if OmegaConf.select(base, key) != value]
    return oc, [f"{key}={'null' if value is None else value}" for key, value in arch], changed


def _dotted(tree: dict, prefix: str):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def forward_flops_per_sample(model_cfg) -> int:
    """Matmul FLOPs (2 per multiply-add) of one sample's forward: in each layer of a tower of width h,
    ffn f and s tokens, 2·s·(4h² + 2hf) for qkv, the attention projection and the MLP, and 4·s²·h for
    QKᵀ and attention × V (the text tower's causal attention counted whole, as kernels and torch's
    FlopCounterMode count it); the patch embedding 2·patches·(channels·patch²)·h; each tower's output
    projection 2·h·o. Left out: LayerNorm, softmax, GELU and the loss (its logits are 2·batch·o per
    sample), a fraction of a percent."""
    v, t = model_cfg.vision, model_cfg.text
    patches = (v.img_h // v.patch_dim) * (v.img_w // v.patch_dim)

    def layers(tower, s: int) -> int:
        h, f = tower.hidden_size, tower.ffn_hidden_size
        return tower.num_layers * (2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h)

    towers = layers(v, v.class_token_length + patches) + layers(t, t.encoder_seq_length)
    patch_embedding = 2 * patches * v.num_channels * v.patch_dim ** 2 * v.hidden_size
    return towers + patch_embedding + 2 * (v.hidden_size + t.hidden_size) * model_cfg.output_dim


def training_flops_per_sample(model_cfg) -> int:
    """Model FLOPs of one training sample: 3 × forward (the backward of every matmul computes the
    gradients of both operands); recomputation by activation checkpointing is not counted (MFU's convention)."""
    return 3 * forward_flops_per_sample(model_cfg)


def counted_forward_flops(cfg) -> int:
    """torch's FlopCounterMode over the forward of one sample through a copy of the model with one
    layer per tower (every layer of a tower counts the same), fp32 on CPU, SDPA's math kernel (the
    one whose matmuls the counter sees on CPU)."""
    from megaclip.model import CLIPModel

    one_layer = OmegaConf.merge(cfg.model, {"vision": {"num_layers": 1}, "text": {"num_layers": 1}})
    model = CLIPModel(one_layer)
    images, tokens = random_batch(OmegaConf.create({"model": one_layer}), 1, torch.device("cpu"))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.encode_image(images), model.encode_text(tokens)
    return counter.get_total_flops(), forward_flops_per_sample(one_layer)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype``: the peak that MFU is measured against."""
    n, iters = (8192, 50) if device.type == "cuda" else (2048, 5)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    now = clock(device)
    _sync(device)
    start = now()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n ** 3 * iters / (now() - start)


def clock(device: torch.device):
    """Wall-clock time on a GPU (after synchronising); on CPU the process's CPU time, which a shared
    machine's other load does not inflate (with one thread it is the wall-clock time of an idle machine)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the steps


class OpenClipStep:
    """open_clip_train's step (train_one_epoch, accum_freq 1): zero the gradients, forward and ClipLoss
    under its precision's autocast, backward, clip the gradient norm, AdamW (main.py's groups: no
    weight decay for gains, biases and the logit scale), clamp the logit scale."""

    def __init__(self, name: str, precision: str, compile_model: bool, device: torch.device, optim):
        open_clip = import_library("open_clip")
        self.model = open_clip.create_model(name, precision=precision, device=device)
        self.model.train()
        named = list(self.model.named_parameters())
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": optim.weight_decay}],
            lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        self.loss = open_clip.ClipLoss()
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "amp_bf16"
                         else contextlib.nullcontext())
        self.input_dtype = torch.bfloat16 if precision == "pure_bf16" else torch.float32
        self.grad_clip = optim.grad_clip

    def __call__(self, images, tokens):
        self.optimizer.zero_grad()
        with self.autocast:
            loss = self.loss(*self.forward(images.to(self.input_dtype), tokens))
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, norm_type=2.0)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return loss


@dataclass
class Variant:
    library: str
    precision: str
    step: Callable
    persistent: int = 0  # bytes held between steps (CUDA)
    peak: int = 0
    times: List[float] = field(default_factory=list)  # seconds per step, one per round


def build_variants(cfg, open_clip_name: str, open_clip_precisions: List[str], compiled: bool, device, warmup: int,
                   batch) -> List[Variant]:
    megaclip_precision = "fp32" if open_clip_precisions == ["fp32"] else "bf16 O2"
    makers = [("open_clip", p, lambda p=p: OpenClipStep(open_clip_name, p, compiled, device, cfg.model.optim))
              for p in open_clip_precisions]
    makers.append(("megaclip", megaclip_precision, lambda: MegaclipStep(cfg, device, compile_layers=compiled)))
    variants = []
    for library, name, make in makers:
        before = _allocated(device)
        variant = Variant(library, name, make())
        for _ in range(warmup):
            variant.step(*batch)
        _sync(device)
        variant.persistent = _allocated(device) - before
        variants.append(variant)
    return variants


def _allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def time_rounds(variants: List[Variant], batch, steps: int, repeats: int, device) -> None:
    now = clock(device)
    for r in range(repeats):
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = _allocated(device)
            _sync(device)
            start = now()
            for _ in range(steps):
                variant.step(*batch)
            _sync(device)
            variant.times.append((now() - start) / steps)
            if device.type == "cuda":
                variant.peak = max(variant.peak, variant.persistent + torch.cuda.max_memory_allocated(device) - before)


# ---------------------------------------------------------------- the table


def compare(args, overrides) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    batch_size = args.batch or (16 if args.model == "tiny" else 256)
    compiles = [{"off": False, "on": True}[c] for c in args.compile.split(",")]
    open_clip_cfg, arch, changed = architectures(args.model, args.layers)
    precision_keys = ["precision=bf16", "model.megatron_amp_O2=true"] if precision == "bf16" else ["precision=32",
                                                                                                 "model.megatron_amp_O2=false"]
    cfg = load_config(MEGACLIP_CONFIGS[args.model], arch + precision_keys + [
        "tp=1", f"gbs={batch_size}", "model.micro_batch_size=null", f"trainer.device={device.type}", *overrides])
    validate(cfg, world_size=1, data=False)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    distributed.init(1, device.type)
    open_clip = import_library("open_clip")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that it loaded no pretrained weights: none are wanted
    open_clip_name = _registered(args.model, open_clip_cfg) if args.model == "tiny" or args.layers else args.model

    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    flops = training_flops_per_sample(cfg.model)
    counted, formula = counted_forward_flops(cfg)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    layers = f", {args.layers} layers per tower" if args.layers else ""
    print(f"{args.model}{layers}, batch {batch_size}, {precision}, {device_name}, torch {torch.__version__}, "
          f"open_clip {open_clip.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"megaclip {MEGACLIP_CONFIGS[args.model]} as open_clip's {args.model}: {'; '.join(changed) or 'no changes'}")
    print(f"model FLOPs per sample (training, 3 x forward): {flops / 1e9:.3f} G; forward formula / torch FlopCounterMode "
          f"(one layer per tower): {formula / counted:.4f}")
    print(f"{'bf16' if precision == 'bf16' else 'fp32'} matmul peak measured: {peak / 1e12:.3g} TFLOP/s; "
          f"{args.repeats} alternating rounds of {args.steps or 5} steps, {args.warmup} warm-up steps, median "
          f"{'wall-clock' if device.type == 'cuda' else 'process CPU'} time")
    print("| library | precision | compile | samples/s | samples/s per GPU | model TFLOP/s | MFU | peak memory (GiB) "
          "| megaclip / this |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    batch = random_batch(cfg, batch_size, device)
    summary = []
    for compiled in compiles:
        open_clip_precisions = ["fp32"] if precision == "fp32" else args.compiled_open_clip.split(",") if compiled else [
            "amp_bf16", "pure_bf16"]
        variants = build_variants(cfg, open_clip_name, open_clip_precisions, compiled, device, args.warmup, batch)
        time_rounds(variants, batch, args.steps or 5, args.repeats, device)
        rate = {id(v): batch_size / statistics.median(v.times) for v in variants}
        megaclip_rate = rate[id(variants[-1])]
        for v in variants:
            tflops = rate[id(v)] * flops / 1e12
            memory = f"{v.peak / GiB:.1f}" if device.type == "cuda" else "-"
            ratio = f"{megaclip_rate / rate[id(v)]:.3f}" if v.library == "open_clip" else "1"
            print(f"| {v.library} | {v.precision} | {'on' if compiled else 'off'} | {rate[id(v)]:.1f} | "
                  f"{rate[id(v)] / distributed.dp_size():.1f} | {tflops:.3g} | {tflops * 1e12 / peak:.1%} | {memory} | {ratio} |",
                  flush=True)
        best = max(variants[:-1], key=lambda v: rate[id(v)])
        summary.append(f"compile {'on' if compiled else 'off'} {megaclip_rate / rate[id(best)]:.3f} (vs {best.precision})")
        del variants
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"megaclip / fastest open_clip at the same compile setting: {', '.join(summary)}", flush=True)
    distributed.shutdown()


def _registered(model: str, open_clip_cfg: dict) -> str:
    """A name open_clip.create_model knows for a config of our own (tiny, or cut to --layers)."""
    path = Path(tempfile.mkdtemp(prefix="megaclip_bench_")) / f"bench-{model}-{open_clip_cfg['vision_cfg']['layers']}.json"
    path.write_text(json.dumps(open_clip_cfg))
    import_library("open_clip").add_model_config(path)
    return path.stem


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Per-GPU memory of a megaclip run: parameters, gradients, optimizer state, activations (GiB).

    python tools/plan_memory.py --config-name clip_G14 --tp 2 --dp 512 --micro-batch 64 \\
        --precision bf16 --o2 --optimizer distributed_fused_adam
    python tools/plan_memory.py --table --dp 1024 --micro-batch 32 --precision bf16 --o2 \\
        --optimizer distributed_fused_adam
    python tools/plan_memory.py --fit --config-name clip_e14 --gpus-per-node 8 --nodes 128 \\
        --precision bf16 --o2 --optimizer distributed_fused_adam
    python tools/plan_memory.py --config-name clip_L14 --micro-batch 128 --micro-batches 512 \\
        --precision bf16 --o2 model.loss_block_size=4096

--fit proposes gradient accumulation (micro-batches of a half, a quarter, ... of the rank's batch) for a
layout that nothing else makes fit.

Unset options come from the config. Trailing key=value overrides apply to the config (to every config
with --table), e.g. model.vision.num_attention_heads=16. The formulas are in megaclip/memory_parameters.py and
megaclip/memory_activations.py.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Dict, List, Optional, Tuple, Union

from megaclip.config import load_config
from megaclip.memory import GiB, OPTIMIZERS, Checkpointing, Layout, layout_problem, least_recompute_fit, plan_memory
from megaclip.memory_activations import activation_bytes
from megaclip.memory_parameters import parameter_shapes

SEED_SIZES = ["clip_B32", "clip_B16", "clip_L14", "clip_H14", "clip_g14", "clip_G14", "clip_e14"]
TABLE_TPS = [1, 2, 4, 8]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config = p.add_mutually_exclusive_group()
    config.add_argument("--config-name", "-c", dest="config", default="clip_tiny", help="a config in configs/")
    config.add_argument("--config", dest="config", help="a config YAML file")
    p.add_argument("--tp", type=int, help="tensor-parallel size")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (default 1)")
    p.add_argument("--micro-batch", type=int, help="samples per GPU per micro step (default: the config's, or global / dp)")
    p.add_argument("--micro-batches", type=int,
                   help="micro steps per optimizer step, gradient accumulation (default: the config's; 1 with --micro-batch)")
    p.add_argument("--precision", choices=["32", "bf16"])
    p.add_argument("--o2", action=argparse.BooleanOptionalAction, help="bf16 weights, fp32 master weights")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--checkpoint", choices=["none", "uniform", "block"],
                   help="full activation checkpointing of both towers")
    p.add_argument("--checkpoint-layers", type=int, default=1, help="k: uniform chunks of k layers, or block's first k")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction)
    p.add_argument("--gpu-gb", type=float, default=80, help="GPU memory in GiB (default 80)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of GPU memory left for the CUDA context, NCCL buffers and fragmentation (default 0.1)")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--table", action="store_true", help="the seven seed sizes at tp 1, 2, 4, 8")
    modes.add_argument("--fit", action="store_true", help="tp, dp and checkpointing that fit --nodes x --gpus-per-node")
    p.add_argument("--gpus-per-node", type=int, default=8, help="--fit: tp stays within a node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="--fit (default 1)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def layout_for(args: argparse.Namespace, cfg, tp: Optional[int] = None, dp: Optional[int] = None) -> Layout:
    """The config's layout with the command line's choices on top."""
    dp = dp or args.dp
    layout = Layout.from_config(cfg, dp)
    micro_batches = args.micro_batches or (1 if args.micro_batch else None)
    changes = dict(tp=tp or args.tp, micro_batch=args.micro_batch, micro_batches=micro_batches, precision=args.precision,
                   o2=args.o2, optimizer=args.optimizer, sequence_parallel=args.sequence_parallel)
    if args.checkpoint:
        method = None if args.checkpoint == "none" else args.checkpoint
        changes.update(vision_checkpointing=Checkpointing(method, args.checkpoint_layers),
                       text_checkpointing=Checkpointing(method, args.checkpoint_layers))
    return layout.replace(**{k: v for k, v in changes.items() if v is not None})


def budget(args: argparse.Namespace) -> int:
    return int(args.gpu_gb * (1 - args.headroom) * GiB)


def verdict(total: int, args: argparse.Namespace) -> str:
    return "fits" if total <= budget(args) else "too big"


def precision_name(layout: Layout) -> str:
    return "fp32" if layout.precision == "32" else "bf16 O2" if layout.o2 else "bf16 autocast"


def describe(layout: Layout) -> str:
    accumulation = f" x {layout.micro_batches} micro-batches" if layout.micro_batches > 1 else ""
    return (f"{precision_name(layout)}, {layout.optimizer}, micro batch {layout.micro_batch}{accumulation}, "
            f"sequence parallel {'on' if layout.sequence_parallel else 'off'}, checkpointing vision "
            f"{checkpointing(layout.vision_checkpointing)}, text {checkpointing(layout.text_checkpointing)}")


def checkpointing(c: Checkpointing) -> str:
    return f"{c.method} {c.num_layers}" if c.method else "none"


def size_name(config: str) -> str:
    """clip_G14 -> G/14."""
    match = re.fullmatch(r"clip_([A-Za-z]+)(\d+)", config)
    return f"{match[1]}/{match[2]}" if match else config


def count(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def show_one(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    layout = layout_for(args, cfg)
    print(f"{args.config}: tp {layout.tp}, dp {layout.dp}, {describe(layout)}")
    problem = layout_problem(cfg.model, layout)
    if problem:
        print(f"impossible: {problem} (tp {layout.tp})")
        return
    plan = plan_memory(cfg, layout)
    acts = activation_bytes(cfg.model, layout)
    params = sum(math.prod(s) for s in parameter_shapes(cfg.model, layout.tp).values())
    print(f"  parameters per GPU {params:>14,}")
    print(f"  params           {gib(plan.params):>8} GiB")
    print(f"  grads            {gib(plan.grads):>8} GiB")
    print(f"  optimizer state  {gib(plan.optimizer_state):>8} GiB")
    print(f"  activations      {gib(plan.activations):>8} GiB   peak of forward and backward (kept at the end of "
          f"the forward: vision {gib(acts.vision)}, text {gib(acts.text)}, loss {gib(acts.loss)})")
    print(f"  optimizer step   {gib(plan.optimizer_step):>8} GiB   transient, once the activations are freed")
    print(f"  total            {gib(plan.total):>8} GiB   params + grads + state + max(activations, step): "
          f"{verdict(plan.total, args)} for {gib(budget(args))} GiB "
          f"({args.gpu_gb:g} GiB less {args.headroom:.0%} headroom)")


def table(args: argparse.Namespace) -> Dict[str, Tuple[int, Dict[int, Union[int, str]]]]:
    """{config: (parameters, {tp: total bytes per GPU, or why tp cannot split the model})}."""
    rows = {}
    for config in SEED_SIZES:
        cfg = load_config(config, args.overrides)
        cells = {}
        for tp in TABLE_TPS:
            layout = layout_for(args, cfg, tp=tp)
            cells[tp] = layout_problem(cfg.model, layout) or plan_memory(cfg, layout).total
        rows[config] = sum(math.prod(s) for s in parameter_shapes(cfg.model, 1).values()), cells
    return rows


def show_table(args: argparse.Namespace) -> None:
    first = layout_for(args, load_config(SEED_SIZES[0], args.overrides))
    print(f"Per-GPU total GiB at dp {first.dp}, {describe(first)}; 'fits': <= {gib(budget(args))} GiB "
          f"({args.gpu_gb:g} GiB less {args.headroom:.0%} headroom)")
    width = 30
    print(f"{'model':6} {'params':>7}  " + "".join(f"{'tp=' + str(tp):{width}}" for tp in TABLE_TPS).rstrip())
    for config, (params, cells) in table(args).items():
        texts = [f"impossible: {c}" if isinstance(c, str) else f"{c / GiB:6.1f} {verdict(c, args)}"
                 for c in cells.values()]
        print(f"{size_name(config):6} {count(params):>7}  " + "".join(f"{t:{width}}" for t in texts).rstrip())


def show_fit(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    gpus = args.gpus_per_node * args.nodes
    base = layout_for(args, cfg, dp=gpus)
    print(f"{args.config} on {args.nodes} x {args.gpus_per_node} = {gpus} GPUs, "
          f"{precision_name(base)}, {base.optimizer}; "
          f"budget {gib(budget(args))} GiB per GPU ({args.gpu_gb:g} GiB less {args.headroom:.0%} headroom)")
    print(f"{'tp':>3} {'dp':>6} {'micro':>6} {'accum':>5} {'seq-par':>8}  {'vision ckpt':12} {'text ckpt':12} "
          f"{'GiB':>6}  recomputed")
    tp = 1
    while tp <= args.gpus_per_node:
        show_fit_row(args, cfg, tp, gpus // tp)
        tp *= 2


def show_fit_row(args: argparse.Namespace, cfg, tp: int, dp: int) -> None:
    if not (args.micro_batch or cfg.model.micro_batch_size) and cfg.model.global_batch_size % dp:
        print(f"{tp:>3} {dp:>6}  global batch {cfg.model.global_batch_size} is not divisible by dp")
        return
    layout = layout_for(args, cfg, tp=tp, dp=dp)
    rank_batch = layout.micro_batch * layout.micro_batches
    problem = layout_problem(cfg.model, layout)
    if problem:
        print(f"{tp:>3} {dp:>6} {layout.micro_batch:>6}  impossible: {problem}")
        return
    # Accumulation only when nothing else fits; then, as its cost (one more forward of both towers) is the
    # same for any number of micro-batches, the fewest that fit without recomputation, else the fewest that fit.
    best = first_fit = None
    for micro_batches in (k for k in range(layout.micro_batches, rank_batch + 1) if rank_batch % k == 0):
        best = best_fit(args, cfg, layout.replace(micro_batch=rank_batch // micro_batches, micro_batches=micro_batches))
        first_fit = first_fit or (best if best.fits else None)
        if best.fits and (micro_batches == layout.micro_batches or best.recomputed == 0):
            break
    else:
        best = first_fit or best
    v, t, chosen = best.layout.vision_checkpointing, best.layout.text_checkpointing, best.layout
    recomputed = f"{best.recomputed:.0%} of layer FLOPs" if best.fits else "does not fit (leanest shown)"
    sequence_parallel = "on" if chosen.sequence_parallel else "off"
    print(f"{tp:>3} {dp:>6} {chosen.micro_batch:>6} {chosen.micro_batches:>5} {sequence_parallel:>8}  "
          f"{checkpointing(v):12} {checkpointing(t):12} {best.plan.total / GiB:6.1f}  {recomputed}")


def best_fit(args: argparse.Namespace, cfg, layout: Layout):
    """With and without sequence parallelism (where it can split the model): among fits the least
    recompute; if none fits, the leanest."""
    options = [least_recompute_fit(cfg, candidate, budget(args)) for candidate in
               (layout.replace(sequence_parallel=sp) for sp in (False, True)) if not layout_problem(cfg.model, candidate)]
    return min(options, key=lambda f: (not f.fits, f.recomputed if f.fits else f.plan.total, f.plan.total))


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.table:
        show_table(args)
    elif args.fit:
        show_fit(args)
    else:
        show_one(args)


if __name__ == "__main__":
    main()

"""Step time with the gradients' DP reduction overlapped with backward vs started after it, in the same
run: the same model, optimizer and batch, the two modes alternating step by step (their order swapped
every repeat), median of each.

    python tools/overlap_benchmark.py [--config-name clip_B32] [--nproc 2] [--micro-batch 2] [--repeats 6] [key=value ...]

Launches itself under torchrun with --nproc processes (DP = nproc / TP). Random in-memory batches, no
data loading. On CPU the default is fp32 (``trainer.precision=32``, no O2): CPUs without bf16 matrix
units emulate bf16 matmuls far slower, which would hide the communication this measures. Prints, on
rank 0, the median step time of each mode, the part of it spent waiting in ``finish_gradients`` (the
communication backward did not hide), and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing megaclip
    sys.path.insert(0, str(ROOT))

CPU_DEFAULTS = ["trainer.precision=32", "model.megatron_amp_O2=false"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-name", default="clip_B32")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2, help="samples per DP rank and step")
    parser.add_argument("--repeats", type=int, default=6, help="steps of each mode, after one warm-up step each")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    return parser.parse_args(argv)


def launch(args) -> int:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), __file__, "--worker",
               "--config-name", args.config_name, "--micro-batch", str(args.micro_batch),
               "--repeats", str(args.repeats), *args.overrides]
    return subprocess.call(command, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megaclip import distributed, precision
    from megaclip.config import load_config
    from megaclip.losses import ClipLoss
    from megaclip.model import CLIPModel
    from megaclip.optim import build_optimizer

    device = distributed.init(1, "auto")
    overrides = (CPU_DEFAULTS if device.type == "cpu" else []) + list(args.overrides)
    world = dist.get_world_size()
    cfg = load_config(args.config_name, [*overrides, f"model.global_batch_size={args.micro_batch * world}"])
    distributed.seed_everything(cfg.model.seed)
    model = precision.prepare_model(CLIPModel(cfg.model), cfg).to(device)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    loss_fn = ClipLoss(cfg.model.local_loss, group=distributed.dp_group())
    autocast = precision.autocast(cfg, device)
    v, t = cfg.model.vision, cfg.model.text
    generator = torch.Generator().manual_seed(distributed.dp_rank())
    images = torch.randn(args.micro_batch, v.num_channels, v.img_h, v.img_w, generator=generator).to(device)
    tokens = torch.randint(4, t.vocab_size, (args.micro_batch, t.encoder_seq_length), generator=generator).to(device)

    def step(overlap: bool):
        optimizer.gradients.overlap = overlap
        dist.barrier()
        start = time.perf_counter()
        with autocast:
            loss = loss_fn(*model(images, tokens))
        loss.backward()
        waited = time.perf_counter()
        optimizer.finish_gradients(cfg.model.optim.grad_clip)
        waited = time.perf_counter() - waited
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, waited

    times = {True: [], False: []}
    for overlap in (True, False):
        step(overlap)  # warm-up
    for repeat in range(args.repeats):
        for overlap in ((True, False) if repeat % 2 == 0 else (False, True)):
            times[overlap].append(step(overlap))
    if dist.get_rank() == 0:
        buckets = len(optimizer.gradients.buckets)
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.config_name}: {params / 1e6:.1f}M params, {buckets} buckets of <= {cfg.model.optim.bucket_size_mb} MB, "
              f"DP={distributed.dp_size()}, micro batch {args.micro_batch}, {cfg.model.optim.name}, "
              f"precision {cfg.trainer.precision}{' O2' if precision.is_o2(cfg) else ''}, device {device}, "
              f"median of {args.repeats} steps each")
        medians = {}
        for overlap, label in ((False, "after backward"), (True, "overlapped")):
            step_s = statistics.median(s for s, _ in times[overlap])
            wait_s = statistics.median(w for _, w in times[overlap])
            medians[overlap] = step_s
            print(f"  {label:15s} step {step_s:7.3f} s   waiting in finish_gradients {wait_s:7.3f} s")
        print(f"  step time overlapped / after backward: {medians[True] / medians[False]:.3f}")
    distributed.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())

"""The memory planner's per-GPU total against torch.cuda.max_memory_allocated over real training steps.

    python tools/check_planner.py --case clip_B16:256 --case clip_L14:128 [--steps 3] [key=value ...]

Each case (config name : micro batch) is built at TP=1, DP=1 with its config's precision and optimizer
(bf16 O2 and distributed_fused_adam for the seed sizes), takes one step to warm up (state that is
allocated lazily), then ``--steps`` steps of tools/benchmark.py's MegaclipStep on a random batch. The
measured figure is the most torch allocated during those steps, less what was allocated before the
model was built (the random batch, which the planner leaves to the data loader); the planned one is
megaclip.memory.plan_memory's total: parameters + gradients + optimizer state + max(activations, the
optimizer step's transients). Neither counts the CUDA context, NCCL's buffers or the allocator's
fragmentation (the planner's --headroom). The target is an error within 10 %.

On CPU there are no allocator statistics: the steps still run (a smoke test of this script) and the
measured column says so; tests/test_memory.py holds the planner to the live tensors on CPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark import MegaclipStep, random_batch  # noqa: E402  (tools/ is on the path when run as a script)
from megaclip import distributed  # noqa: E402
from megaclip.config import load_config  # noqa: E402
from megaclip.config_checks import validate  # noqa: E402
from megaclip.memory import GiB, Layout, plan_memory  # noqa: E402


def check(config_name: str, batch: int, steps: int, overrides, device: torch.device):
    """(plan, measured bytes or None on CPU) for one case."""
    cfg = load_config(config_name, [*overrides, "tp=1", f"gbs={batch}", "model.micro_batch_size=null",
                                    f"trainer.device={device.type}"])
    validate(cfg, world_size=1, data=False)
    plan = plan_memory(cfg, Layout.from_config(cfg, dp=1))
    images, tokens = random_batch(cfg, batch, device)
    before = _allocated(device)
    step = MegaclipStep(cfg, device)
    step(images, tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step(images, tokens)
    measured = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    del step
    gc.collect()
    return cfg, plan, measured


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", metavar="CONFIG:BATCH",
                        help="a config name and a micro batch (repeatable; default clip_B16:256 and clip_L14:128)")
    parser.add_argument("--steps", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    distributed.init(1, device.type)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU: no allocator statistics, measured column empty"
    print(f"memory planner vs torch.cuda.max_memory_allocated, TP=1 DP=1, {args.steps} steps after one, {where}")
    print("| config | micro batch | precision | optimizer | planned (GiB) | params + grads + optimizer | activations "
          "| optimizer step | measured (GiB) | error |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    worst = 0.0
    for case in args.case or ["clip_B16:256", "clip_L14:128"]:
        name, batch = case.split(":")
        cfg, plan, measured = check(name, int(batch), args.steps, overrides, device)
        precision = "fp32" if cfg.trainer.precision == "32" else "bf16 O2" if cfg.model.megatron_amp_O2 else "bf16"
        error = "-" if measured is None else f"{(plan.total - measured) / measured:+.1%}"
        if measured is not None:
            worst = max(worst, abs(plan.total - measured) / measured)
        print(f"| {name} | {batch} | {precision} | {cfg.model.optim.name} | {plan.total / GiB:.2f} | "
              f"{(plan.params + plan.grads + plan.optimizer_state) / GiB:.2f} | {plan.activations / GiB:.2f} | "
              f"{plan.optimizer_step / GiB:.2f} | {'-' if measured is None else f'{measured / GiB:.2f}'} | {error} |", flush=True)
    if device.type == "cuda":
        print(f"largest error {worst:.1%} ({'within' if worst <= 0.10 else 'outside'} the 10 % target)")
    distributed.shutdown()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())

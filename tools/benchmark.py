"""Step time and peak memory of training steps, one row per setting, printed as a table.

    python tools/benchmark.py [--config-name clip_tiny] [--steps 20] [--nproc 2] [key=value ...]
    python tools/benchmark.py --config-name clip_L14 --nproc 1 gbs=128 trainer.compile=true

Each row runs in its own torchrun job (so peak memory is that setting's alone) on random batches, no
data loading: it measures the model, loss and optimizer. Peak memory is torch.cuda.max_memory_allocated
on GPU and the process's peak resident set on CPU (which includes the Python runtime).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = {  # name -> config overrides
    "fp32, fused_adam": [],
    "bf16 autocast": ["precision=bf16"],
    "bf16 O2": ["precision=bf16", "model.megatron_amp_O2=true"],
    "bf16 O2 + distributed_fused_adam": ["precision=bf16", "model.megatron_amp_O2=true", "model.optim.name=distributed_fused_adam"],
    "checkpointing uniform k=1": [f"model.{t}.{k}={v}" for t in ("vision", "text") for k, v in (
        ("activations_checkpoint_granularity", "full"), ("activations_checkpoint_method", "uniform"),
        ("activations_checkpoint_num_layers", 1))],
    # the vision sequence (class tokens + patches) must divide by tp: 2 + 16 for clip_tiny
    "sequence parallel": ["model.sequence_parallel=true", "model.vision.class_token_length=2"],
}


def worker(config_name: str, steps: int, overrides: list) -> None:
    import torch

    from megaclip import distributed, precision
    from megaclip.config import load_config, micro_batch_size, validate, world_size_from_env
    from megaclip.model import CLIPModel
    from megaclip.monitor import peak_memory_bytes
    from megaclip.objectives import build_objective
    from megaclip.optim import build_optimizer

    cfg = load_config(config_name, overrides)
    world = world_size_from_env()
    validate(cfg, world, data=False)
    device = distributed.init(cfg.model.tensor_model_parallel_size, cfg.trainer.device)
    distributed.seed_everything(cfg.model.seed)
    model = precision.prepare_model(CLIPModel(cfg.model), cfg).to(device)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    objective = build_objective(cfg.model, distributed.dp_group())
    v, t, batch = cfg.model.vision, cfg.model.text, micro_batch_size(cfg, world)
    images = torch.randn(batch, v.num_channels, v.img_h, v.img_w, device=device)
    tokens = torch.randint(1, t.vocab_size, (batch, t.encoder_seq_length), device=device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with precision.autocast(cfg, device):
            loss, _ = objective(model, images, tokens)
        loss.backward()
        optimizer.finish_gradients(cfg.model.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # waits for the device
        times.append(time.perf_counter() - start)
    step_time = sorted(times[len(times) // 2:])[len(times) // 4]  # median of the second half (warm)
    peak = peak_memory_bytes()
    if distributed.is_main():
        print("RESULT " + json.dumps({"step_s": step_time, "samples_s": cfg.model.global_batch_size / step_time,
                                      "peak_bytes": peak, "loss": loss.item()}), flush=True)
    distributed.shutdown()


def run_setting(config_name: str, steps: int, nproc: int, overrides: list) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), __file__, "--worker",
           "--config-name", config_name, "--steps", str(steps), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="clip_tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2, help="processes per setting (sequence parallel needs tp > 1)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.worker:
        return worker(args.config_name, args.steps, overrides)
    print(f"{args.config_name}, {args.nproc} processes, {args.steps} steps, extra overrides: {' '.join(overrides) or '-'}")
    print("| setting | layout | step time (ms) | samples/s | peak memory (MiB) |\n|---|---|---|---|---|")
    for name, setting in SETTINGS.items():
        layouts = [f"tp={args.nproc}"] if "sequence" in name else ["tp=1", f"tp={args.nproc}"]
        for layout in layouts:
            r = run_setting(args.config_name, args.steps, args.nproc, [layout, *overrides, *setting])
            dp = args.nproc // int(layout.split("=")[1])
            shape = f"{layout.replace('=', ' ')} dp {dp}"
            if "error" in r:
                print(f"| {name} | {shape} | failed: {r['error']} | | |")
            else:
                print(f"| {name} | {shape} | {1000 * r['step_s']:.1f} | {r['samples_s']:.0f} | {r['peak_bytes'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Training-step speed on random batches (no data loading): the model, the loss and the optimizer.

Two tables:

    python tools/benchmark.py [--config-name clip_tiny] [--steps 20] [--nproc 2] [key=value ...]

one row per megaclip setting (precision, optimizer, checkpointing, sequence parallel) and layout, each
in its own torchrun job so that its peak memory is its own (torch.cuda.max_memory_allocated on GPU,
the process's peak resident set on CPU, which includes the Python runtime);

    python tools/benchmark.py --vs-open-clip --model ViT-L-14 --batch 128 [--compile off,on] [key=value ...]

open_clip's and megaclip's training steps side by side in one process on one device, on the same
architecture (megaclip's config for that size, with open_clip's head counts and widths where they
differ, which the output names), the same batch and precision: open_clip as open_clip_train runs it
(amp_bf16 and pure_bf16, AdamW, gradient clipping to the megaclip config's grad_clip, the logit scale
clamped; torch.compile of the whole model) and megaclip's bf16 O2 step (its config's optimizer;
compile of its layers). Repeats alternate between the variants; each row is the median (wall-clock
time on a GPU, the process's CPU time on a shared CPU). tools/vs_open_clip.py has the FLOP count
(``training_flops_per_sample``); README "Speed" explains the columns.
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
if str(ROOT) not in sys.path:  # run from a checkout without installing megaclip
    sys.path.insert(0, str(ROOT))

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


class MegaclipStep:
    """megaclip's training step as megaclip.train runs it, on given batches: one micro-batch, the
    non-finite guard on the device (its host read left out, as on the loop's steps between reads),
    no logging or schedule."""

    def __init__(self, cfg, device, compile_layers: bool = False):
        from megaclip import distributed, precision
        from megaclip.guard import StepGuard
        from megaclip.model import CLIPModel
        from megaclip.objectives import build_objective
        from megaclip.optim import build_optimizer

        distributed.seed_everything(cfg.model.seed)
        self.cfg = cfg
        self.model = precision.prepare_model(CLIPModel(cfg.model), cfg).to(device)
        if compile_layers:
            for tower in filter(None, (self.model.visual, self.model.text)):
                tower.transformer.compile_layers(cfg.trainer.compile_backend)
        self.optimizer = build_optimizer(self.model, cfg.model, distributed.dp_group(), distributed.tp_group())
        self.objective = build_objective(cfg.model, distributed.dp_group())
        self.autocast = precision.autocast(cfg, device)
        self.device = device
        self.guard = StepGuard(max_consecutive_nonfinite=cfg.trainer.max_consecutive_nonfinite, every_n_minutes=0,
                               device=device)
        self.steps = 0

    def __call__(self, images, tokens):
        from megaclip import accumulation

        self.steps += 1
        with self.autocast:
            loss, _ = accumulation.step(self.objective, self.model, images, tokens, 1, self.device, self.optimizer)
        norm = self.optimizer.finish_gradients(self.cfg.model.optim.grad_clip)
        self.optimizer.step(skip=self.guard.check(self.steps, loss, norm, read=False).skip)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        return loss


# ---------------------------------------------------------------- megaclip settings, one torchrun job each


def worker(config_name: str, steps: int, overrides: list) -> None:
    from megaclip import distributed
    from megaclip.config import load_config, micro_batch_size, world_size_from_env
    from megaclip.config_checks import validate
    from megaclip.monitor import peak_memory_bytes

    cfg = load_config(config_name, overrides)
    world = world_size_from_env()
    validate(cfg, world, data=False)
    device = distributed.init(cfg.model.tensor_model_parallel_size, cfg.trainer.device)
    step = MegaclipStep(cfg, device)
    images, tokens = random_batch(cfg, micro_batch_size(cfg, world), device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(images, tokens)
        loss.item()  # waits for the device
        times.append(time.perf_counter() - start)
    step_time = sorted(times[len(times) // 2:])[len(times) // 4]  # median of the second half (warm)
    if distributed.is_main():
        print("RESULT " + json.dumps({"step_s": step_time, "samples_s": cfg.model.global_batch_size / step_time,
                                      "peak_bytes": peak_memory_bytes(), "loss": loss.item()}), flush=True)
    distributed.shutdown()


def random_batch(cfg, batch: int, device):
    """Images from a normal distribution and token ids anywhere in the vocabulary, on ``device``."""
    import torch

    v, t = cfg.model.vision, cfg.model.text
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, v.num_channels, v.img_h, v.img_w, device=device, generator=g)
    tokens = torch.randint(0, t.vocab_size, (batch, t.encoder_seq_length), device=device, generator=g)
    return images, tokens


def run_setting(config_name: str, steps: int, nproc: int, overrides: list) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), __file__, "--worker",
           "--config-name", config_name, "--steps", str(steps), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(lines[-1][len("RESULT "):])


def settings_table(args, overrides) -> None:
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="clip_tiny", help="settings table: the megaclip config")
    parser.add_argument("--steps", type=int, default=None,
                        help="settings table: steps per setting (default 20); --vs-open-clip: timed steps per repeat (default 5)")
    parser.add_argument("--nproc", type=int, default=2, help="settings table: processes per setting (sequence parallel needs tp > 1)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vs-open-clip", action="store_true", help="open_clip and megaclip side by side (one process, one device)")
    parser.add_argument("--model", default="ViT-B-16", help="--vs-open-clip: ViT-B-16, ViT-L-14, ViT-g-14, ViT-B-32 or tiny")
    parser.add_argument("--batch", type=int, default=None, help="--vs-open-clip: samples per step (default 256; tiny 16)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="--vs-open-clip: bf16 (open_clip amp_bf16 and pure_bf16, megaclip bf16 O2; default on GPU) "
                             "or fp32 (default on CPU)")
    parser.add_argument("--compile", default="off,on", help="--vs-open-clip: off, on or off,on (default)")
    parser.add_argument("--compiled-open-clip", default="amp_bf16,pure_bf16",
                        help="--vs-open-clip, bf16: the open_clip precisions to run compiled (default both; "
                             "whole-model compilation takes the longest)")
    parser.add_argument("--repeats", type=int, default=5, help="--vs-open-clip: alternating rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="--vs-open-clip: untimed steps per variant (default 3)")
    parser.add_argument("--layers", type=int, default=None, help="--vs-open-clip: cut both towers to this many layers")
    args, overrides = parser.parse_known_args(argv)
    if args.worker:
        return worker(args.config_name, args.steps or 20, overrides)
    if args.vs_open_clip:
        from vs_open_clip import compare

        return compare(args, overrides)
    args.steps = args.steps or 20
    settings_table(args, overrides)


if __name__ == "__main__":
    main()

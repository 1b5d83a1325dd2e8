"""A few TP=1 training steps on the GPU against the same steps on the CPU: same seed, weights and batches.

    python tools/check_gpu_equality.py [--config-name clip_B32] [--layers 2] [--steps 5] [--batch 16] [key=value ...]

Each run is its own process (its own process group: NCCL on the GPU, gloo on the CPU) that trains
``--steps`` steps of megaclip's training step (tools/benchmark.py's MegaclipStep) on fixed random batches
and saves its per-step losses and the first step's gradients. One table compares

- GPU fp32 (TF32 off) with CPU fp32: the same arithmetic in other kernels, i.e. other summation
  orders. A reordered fp32 sum of n products moves by ~sqrt(n)·eps of its terms; with n up to ~1e5
  (batch × tokens × width) that is ~4e-5 relative (tests/test_open_clip_step.py's bound between
  megaclip's and open_clip's kernels), for the first step's gradient (measured over the whole model,
  where the attention key bias, zero in exact arithmetic and pure rounding noise, weighs nothing).
  Over the steps Adam's update, g/(|g| + eps), carries a gradient's relative error into the weights
  unchanged (or less) except where |g| is near eps, and the loss follows the weights: within 1e-4.
- GPU bf16 O2 with CPU bf16 O2, and with CPU fp32: bf16 keeps 8 significant bits (each rounding errs by
  up to 2^-9 ≈ 0.2 %), activations are rounded at every layer and the weights after every step: a few
  percent through the layers. The bound is tests/test_scale.py's for O2 against fp32 on CPU: losses
  within 5 %, and the first step's whole-model gradient within 5 %.

Without a GPU the CPU runs are compared with each other (a smoke test of this script; fp32 is then
bitwise equal) and the GPU rows say they were skipped.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRECISIONS = {"fp32": ["precision=32", "model.megatron_amp_O2=false"], "bf16 O2": ["precision=bf16", "model.megatron_amp_O2=true"]}
# (device under test, its precision, reference device, reference precision, loss tolerance, gradient tolerance)
COMPARISONS = [("cuda", "fp32", "cpu", "fp32", 1e-4, 4e-5), ("cuda", "bf16 O2", "cpu", "bf16 O2", 0.05, 0.05),
               ("cuda", "bf16 O2", "cpu", "fp32", 0.05, 0.05)]


def run(device: str, precision: str, config_name: str, steps: int, batch: int, overrides, out: Path) -> None:
    """One process's steps; saves {"losses": [...], "grads": {name: tensor}} (fp32, on CPU) to ``out``."""
    from benchmark import MegaclipStep
    from megaclip import distributed
    from megaclip.config import load_config
    from megaclip.config_checks import validate
    from megaclip.data.tokenizer import end_of_text_id

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    cfg = load_config(config_name, [*overrides, *PRECISIONS[precision], "tp=1", f"gbs={batch}", "model.micro_batch_size=null",
                                    f"trainer.device={device}"])
    validate(cfg, world_size=1, data=False)
    distributed.init(1, device)
    step = MegaclipStep(cfg, torch.device(device))
    eot = end_of_text_id(cfg.model.text.tokenizer.library)
    batches = [[t.to(device) for t in fixed_batch(cfg, batch, seed=i, eot=eot)] for i in range(steps)]
    # the first batch's gradient at the initial weights, taken aside (autograd.grad fills no .grad and
    # starts none of the optimizer's gradient hooks)
    named = [(n, p) for n, p in step.model.named_parameters() if p.requires_grad]
    with step.autocast:
        loss, _ = step.objective(step.model, *batches[0])
    grads = {n: g.float().cpu() for (n, _), g in zip(named, torch.autograd.grad(loss, [p for _, p in named]))}
    losses = [step(*b).item() for b in batches]
    torch.save({"losses": losses, "grads": grads}, out)
    distributed.shutdown()


def fixed_batch(cfg, batch: int, seed: int, eot: int):
    """Random images, and token rows of random ids with an end-of-text token at a random position."""
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.model.vision, cfg.model.text
    images = torch.randn(batch, v.num_channels, v.img_h, v.img_w, generator=g)
    tokens = torch.randint(1, min(t.vocab_size, eot), (batch, t.encoder_seq_length), generator=g)
    tokens[torch.arange(batch), torch.randint(1, t.encoder_seq_length, (batch,), generator=g)] = eot
    return images, tokens


def spawn(device, precision, args, overrides, folder: Path) -> dict:
    out = folder / f"{device}_{precision.replace(' ', '_')}.pt"
    if not out.exists():
        cmd = [sys.executable, __file__, "--run", device, precision, "--out", str(out), "--config-name", args.config_name,
               "--steps", str(args.steps), "--batch", str(args.batch), "--layers", "0", *overrides]
        for _ in range(3):  # another process may take the free port before this one listens on it
            env = os.environ | {"MASTER_PORT": str(_free_port()), "PYTHONPATH": os.pathsep.join(filter(None, [
                str(ROOT), os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if "EADDRINUSE" not in proc.stderr:
                break
        if proc.returncode:
            raise SystemExit(f"{device} {precision} run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return torch.load(out)


def whole_model_difference(grads: dict, reference: dict) -> float:
    """||g - g_ref|| / ||g_ref|| over all parameters together."""
    assert grads.keys() == reference.keys()
    diff = sum(float((grads[n] - reference[n]).pow(2).sum()) for n in reference)
    norm = sum(float(reference[n].pow(2).sum()) for n in reference)
    return (diff / norm) ** 0.5


def compare(args, overrides) -> int:
    gpu = torch.cuda.is_available()
    comparisons = COMPARISONS if gpu else [("cpu", "bf16 O2", "cpu", "fp32", 0.05, 0.05)]
    print(f"TP=1 training steps, GPU vs CPU: {args.config_name} {' '.join(overrides)}, batch {args.batch}, {args.steps} steps")
    if not gpu:
        print("GPU rows skipped: torch sees no GPU here; the CPU's bf16 O2 run against its fp32 run instead")
    print("| device under test | reference | max loss rel. diff | step-1 gradient rel. diff (whole model) | tolerance | verdict |")
    print("|---|---|---|---|---|---|", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory() as folder:
        for device, precision, ref_device, ref_precision, loss_tol, grad_tol in comparisons:
            result = spawn(device, precision, args, overrides, Path(folder))
            reference = spawn(ref_device, ref_precision, args, overrides, Path(folder))
            loss_diff = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"]))
            grad_diff = whole_model_difference(result["grads"], reference["grads"])
            ok = loss_diff <= loss_tol and grad_diff <= grad_tol
            failed += not ok
            print(f"| {device} {precision} | {ref_device} {ref_precision} | {loss_diff:.2e} | {grad_diff:.2e} | "
                  f"{loss_tol:g} / {grad_tol:g} | {'ok' if ok else 'DIFFERENT'} |", flush=True)
    return 1 if failed else 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="clip_B32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2, help="layers per tower (0: the config's)")
    parser.add_argument("--run", nargs=2, metavar=("DEVICE", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.layers:
        overrides = [f"model.vision.num_layers={args.layers}", f"model.text.num_layers={args.layers}", *overrides]
    if args.run:
        device, precision = args.run
        return run(device, precision, args.config_name, args.steps, args.batch, overrides, Path(args.out)) or 0
    return compare(args, overrides)


if __name__ == "__main__":
    sys.exit(main())

"""Training-step time of gradient accumulation (megaclip.accumulation: GradCache for CLIP and SigLIP) and
of the tiled loss (model.loss_block_size), as ratios to the step over the whole batch at once:

    python tools/accumulation_timing.py [--config-name clip_tiny] [--rounds 8] [--batch 64] \\
        [--micro-batches 4] [--block 16] [--layers N] [key=value ...]

One model, optimizer and batch; the settings alternate step by step in one process on one CPU thread,
timed in CPU time, each ratio the median over the rounds of that round's setting / whole-batch step
(tools/objective_timing.py's method). One process means DP = 1: no features are exchanged.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tools"):  # run from a checkout without installing megaclip
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from megaclip import accumulation, distributed  # noqa: E402
from megaclip.config import load_config  # noqa: E402
from megaclip.model import CLIPModel  # noqa: E402
from megaclip.objectives import build_objective  # noqa: E402
from megaclip.optim import build_optimizer  # noqa: E402
from objective_timing import measure_and_report, one_process  # noqa: E402


def step(model, optimizer, objective, images, tokens, micro_batches: int, grad_clip: float):
    """A training step as megaclip.train runs it; returns its CPU time."""
    def run() -> float:
        start = time.process_time()
        accumulation.step(objective, model, images, tokens, micro_batches, torch.device("cpu"), optimizer)
        optimizer.finish_gradients(grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - start
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="clip_tiny")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--block", type=int, default=16, help="model.loss_block_size of the tiled settings")
    p.add_argument("--layers", type=int, help="layers of each tower (default: the config's)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    one_process(port=29534)
    layers = [f"model.{t}.num_layers={args.layers}" for t in ("vision", "text")] if args.layers else []
    cfg = load_config(args.config_name, layers + args.overrides)
    m = cfg.model
    torch.manual_seed(m.seed)
    model = CLIPModel(m)
    optimizer = build_optimizer(model, m, distributed.dp_group(), distributed.tp_group())
    images = torch.randn(args.batch, m.vision.num_channels, m.vision.img_h, m.vision.img_w)
    tokens = torch.randint(1, m.text.vocab_size, (args.batch, m.text.encoder_seq_length))
    k, tiled = args.micro_batches, [f"model.loss_block_size={args.block}"]

    def objective(micro_batches: int, *extra: str):
        """As the loop builds it for this many micro-batches (mbs set: the fusion terms run in chunks of it)."""
        setting = load_config(args.config_name, layers + args.overrides + [f"mbs={args.batch // micro_batches}", *extra])
        return build_objective(setting.model, distributed.dp_group())

    settings = {name: step(model, optimizer, objective(micro_batches, *extra), images, tokens, micro_batches, m.optim.grad_clip)
                for name, micro_batches, extra in (
                    ("whole batch", 1, []),
                    (f"{k} micro-batches", k, []),
                    (f"whole batch, tiled loss {args.block}", 1, tiled),
                    (f"{k} micro-batches, tiled loss {args.block}", k, tiled))}
    return measure_and_report(settings, args, "whole batch", f" ({m.loss})")


if __name__ == "__main__":
    sys.exit(main())

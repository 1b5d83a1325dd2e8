"""Training-step time of the objectives (clip, siglip, catlip) and of patch dropout (model.vision.
drop_patch_rate 0 / 0.5 / 0.75), as ratios to CLIP's step, on random batches in one process:

    python tools/objective_timing.py [--config-name clip_tiny] [--rounds 8] [--batch 64] [--layers N] [key=value ...]

The settings run in one process on one CPU thread, alternating step by step (the order rotated every
round), each timed in CPU time (time.process_time), so that another job on a shared machine slows each
setting alike and mostly not at all; every ratio is the median over the rounds of that round's
setting / CLIP step. The patch-dropout settings are CLIP's model with its rate changed between steps (the
same weights). One process means DP = 1: no features are exchanged, so the ratios show what the towers,
heads and losses cost, not the exchanges CLIP and SigLIP add at DP > 1 (CatLIP has none).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing megaclip
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megaclip import distributed  # noqa: E402
from megaclip.config import load_config  # noqa: E402
from megaclip.model import CLIPModel  # noqa: E402
from megaclip.objectives import build_objective  # noqa: E402
from megaclip.optim import build_optimizer  # noqa: E402

OBJECTIVES = {"clip": [], "siglip": ["model.loss=siglip"], "catlip": ["model.loss=catlip"]}
PATCH_RATES = (0.5, 0.75)


class Step:
    """One objective's model, optimizer and batch; ``()`` runs a training step and returns its CPU time."""

    def __init__(self, cfg, batch: int, classes: int):
        m = cfg.model
        torch.manual_seed(m.seed)
        self.model = CLIPModel(m, classes if m.loss == "catlip" else None)
        self.optimizer = build_optimizer(self.model, m, distributed.dp_group(), distributed.tp_group())
        self.objective = build_objective(m, distributed.dp_group())
        self.grad_clip = m.optim.grad_clip
        self.images = torch.randn(batch, m.vision.num_channels, m.vision.img_h, m.vision.img_w)
        if m.loss == "catlip":  # multi-hot targets, a few classes a caption as real captions name
            self.batch = (torch.rand(batch, classes) < min(1.0, 4 / classes)).float()
        else:
            self.batch = torch.randint(1, m.text.vocab_size, (batch, m.text.encoder_seq_length))

    def __call__(self) -> float:
        start = time.process_time()
        loss, _ = self.objective(self.model, self.images, self.batch)
        loss.backward()
        self.optimizer.finish_gradients(self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.process_time() - start


def with_patch_rate(step: Step, rate: float):
    """CLIP's step with the vision tower's patch dropout rate set to ``rate`` for it."""
    def run() -> float:
        step.model.visual.patch_dropout.rate = rate
        try:
            return step()
        finally:
            step.model.visual.patch_dropout.rate = 0.0
    return run


def measure(settings, rounds: int, warmup: int = 2):
    """{name: [CPU seconds per round]}, the settings alternating, their order rotated every round."""
    names = list(settings)
    for _ in range(warmup):
        for name in names:
            settings[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(settings[name]())
    return times


def one_process(port: int) -> None:
    """A one-rank process group on one CPU thread (the timing tools' setting)."""
    torch.set_num_threads(1)
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    distributed.init(1, "cpu")


def print_ratios(times, reference: str) -> None:
    """The table: each setting's median CPU seconds and its ratio to ``reference``'s step of the same round."""
    width = max(len(name) for name in times) + 2
    print(f"{'setting':{width}} {'median s':>9} {'ratio to ' + reference + ' (median, min-max over rounds)':>46}")
    for name, seconds in times.items():
        ratios = [s / r for s, r in zip(seconds, times[reference])]
        print(f"{name:{width}} {statistics.median(seconds):9.3f} {statistics.median(ratios):>20.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")


def measure_and_report(settings, args, reference: str, what: str = "") -> int:
    """Time ``settings`` over ``args.rounds``, print the run's heading and the ratio table, end the
    process group; the tools' exit code."""
    times = measure(settings, args.rounds)
    layers = [f"model.{t}.num_layers={args.layers}" for t in ("vision", "text")] if args.layers else []
    changes = " ".join(layers + args.overrides)
    print(f"{args.config_name}{' ' + changes if changes else ''}{what}, batch {args.batch}, {args.rounds} rounds, 1 CPU thread")
    print_ratios(times, reference)
    distributed.shutdown()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="clip_tiny")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", type=int, help="layers of each tower (default: the config's)")
    p.add_argument("--classes", type=int, default=2000, help="CatLIP's class count (the paper keeps 2k-25k)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    one_process(port=29533)
    layers = [f"model.{t}.num_layers={args.layers}" for t in ("vision", "text")] if args.layers else []
    steps = {name: Step(load_config(args.config_name, layers + args.overrides + keys), args.batch, args.classes)
             for name, keys in OBJECTIVES.items()}
    settings = {**steps, **{f"clip, drop_patch_rate {rate}": with_patch_rate(steps["clip"], rate) for rate in PATCH_RATES}}
    return measure_and_report(settings, args, "clip")


if __name__ == "__main__":
    sys.exit(main())

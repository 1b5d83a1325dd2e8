"""What the fusion layers cost, as ratios on this machine (one process):

    python tools/benchmark_fusion.py [--config-name clip_tiny_fusion] [--steps 10] [--repeats 3] [key=value ...]
    python tools/benchmark_fusion.py --checkpoint runs/clip_tiny_fusion/checkpoints [--repeats 3]

The first: the training step (random batches, megaclip's step as tools/benchmark.py runs it) with
model.fusion.num_layers 0, 1 and 2, rounds alternating between them, each the median of its rounds.
The second: evaluation of a trained fusion checkpoint on its val split, contrastive retrieval alone
and re-ranked at k = 8, 16 and 32 (re-ranking scores only the queries whose best positive is in their
shortlist, so a trained model is what shows its cost).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing megaclip
    sys.path.insert(0, str(ROOT))

LAYERS = (0, 1, 2)
RERANK_K = (0, 8, 16, 32)


def step_times(config_name: str, steps: int, repeats: int, overrides: list) -> dict:
    import torch

    from megaclip import distributed
    from megaclip.config import load_config
    from tools.benchmark import MegaclipStep, random_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29571"), RANK="0", WORLD_SIZE="1")
    distributed.init(1, "cpu")
    variants = {}
    for layers in LAYERS:
        cfg = load_config(config_name, [*overrides, f"model.fusion.num_layers={layers}"])
        variants[layers] = (MegaclipStep(cfg, torch.device("cpu")), random_batch(cfg, cfg.model.global_batch_size, "cpu"))
    rounds = {layers: [] for layers in LAYERS}
    for _ in range(repeats):
        for layers, (step, (images, tokens)) in variants.items():
            step(images, tokens)  # warm
            start = time.perf_counter()
            for _ in range(steps):
                step(images, tokens).item()
            rounds[layers].append((time.perf_counter() - start) / steps)
    distributed.shutdown()
    return {layers: statistics.median(times) for layers, times in rounds.items()}


def eval_times(checkpoint: str, repeats: int) -> dict:
    import torch

    from megaclip.checkpoint.model import load_model_for_inference
    from megaclip.data import prepare
    from megaclip.data.eval_loader import build_eval_loader
    from megaclip.data.tokenizer import build_tokenizer
    from megaclip.data.transforms import transforms_from_config
    from megaclip.evaluate import evaluate_retrieval

    model, cfg = load_model_for_inference(checkpoint)
    m = cfg.model
    sources = prepare.resolve(m)
    tokenizer = build_tokenizer(m.text.tokenizer.library, sources.tokenizer_model, m.text.encoder_seq_length)
    _, transform = transforms_from_config(m.vision)
    batches = list(build_eval_loader(sources.val_shards, m.data, dp_rank=0, dp_size=1, batch_size=256,
                                     image_transform=transform, tokenizer=tokenizer))
    rounds, metrics = {k: [] for k in RERANK_K}, {}
    for _ in range(repeats):
        for k in RERANK_K:
            start = time.perf_counter()
            metrics[k] = evaluate_retrieval(model, batches, torch.device("cpu"), contextlib.nullcontext(), rerank_k=k)
            rounds[k].append(time.perf_counter() - start)
    return {k: (statistics.median(times), metrics[k]) for k, times in rounds.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark_fusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="clip_tiny_fusion")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    parser.add_argument("--checkpoint", help="a trained fusion checkpoint: time its evaluation instead")
    args, overrides = parser.parse_known_args(argv)
    if args.checkpoint:
        times = eval_times(args.checkpoint, args.repeats)
        base = times[0][0]
        for k, (seconds, metrics) in times.items():
            figures = " ".join(f"{name}={metrics[name]:.4f}" for name in ("i2t_R@1", "t2i_R@1", "rerank_i2t_R@1", "rerank_t2i_R@1")
                               if name in metrics)
            print(f"rerank_k={k:<3d} eval {seconds:.2f}s  x{seconds / base:.2f} of contrastive-only  {figures}", flush=True)
        return
    times = step_times(args.config_name, args.steps, args.repeats, overrides)
    for layers, seconds in times.items():
        print(f"fusion.num_layers={layers}  step {seconds * 1000:.0f} ms  x{seconds / times[0]:.2f} of no fusion", flush=True)


if __name__ == "__main__":
    main()

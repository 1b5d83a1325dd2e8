"""The training loop: build everything from the config, step, log, evaluate."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from megaclip import distributed, precision
from megaclip.checkpoint import CheckpointError
from megaclip.checkpoint import training as checkpointing
from megaclip.config import ConfigError, micro_batch_size
from megaclip.data import prepare
from megaclip.data.loader import build_eval_loader, build_train_loader
from megaclip.data.tokenizer import build_tokenizer
from megaclip.data.transforms import OPENAI_MEAN, OPENAI_STD, eval_transform, train_transform
from megaclip.evaluate import evaluate_retrieval
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel
from megaclip.optim import build_optimizer, cosine_schedule


@dataclass
class TrainResult:
    step: int = 0
    losses: List[float] = field(default_factory=list)
    evals: Dict[int, Dict[str, float]] = field(default_factory=dict)


def log(msg: str) -> None:
    if distributed.is_main():
        print(msg, flush=True)


def build_loaders(cfg, world_size: int):
    m = cfg.model
    prepare.ensure_synthetic(m)
    sources = prepare.resolve(m)
    tokenizer = build_tokenizer(m.text.tokenizer.library, sources.tokenizer_model, m.text.encoder_seq_length)
    if tokenizer.vocab_size > m.text.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is {m.text.vocab_size}")
    v = m.vision
    mean, std = v.image_mean or OPENAI_MEAN, v.image_std or OPENAI_STD
    image_size = v.img_h  # square, checked by the config
    dp_rank, dp_size = distributed.dp_rank(), distributed.dp_size()
    train = build_train_loader(
        sources.train_shards, dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=micro_batch_size(cfg, world_size),
        image_transform=train_transform(image_size, mean, std), tokenizer=tokenizer,
        num_workers=m.data.num_workers, seed=m.seed, shuffle_buffer=m.data.shuffle_buffer)

    def val():  # a fresh pass over the held-out split each time
        return build_eval_loader(sources.val_shards, dp_rank=dp_rank, dp_size=dp_size, batch_size=256,
                                 image_transform=eval_transform(image_size, mean, std), tokenizer=tokenizer)

    return train, val


def train(cfg, world_size: int) -> TrainResult:
    m, t = cfg.model, cfg.trainer
    device = distributed.init(m.tensor_model_parallel_size, t.device)
    distributed.seed_everything(m.seed)
    train_loader, val_loader = build_loaders(cfg, world_size)
    model = precision.prepare_model(CLIPModel(m), cfg).to(device)
    optimizer = build_optimizer(model, m, distributed.dp_group(), distributed.tp_group())
    scheduler = cosine_schedule(optimizer, m.optim, t.max_steps)
    loss_fn = ClipLoss(m.local_loss, m.gather_with_grad, group=distributed.dp_group())
    autocast = precision.autocast(cfg, device)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params per rank, tp={distributed.tp_size()} "
        f"dp={distributed.dp_size()}, global batch {m.global_batch_size}, device {device}")

    checkpoints = Path(cfg.exp_manager.exp_dir) / "checkpoints"
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler, loader=train_loader)
    resumed = checkpointing.resume(checkpoints, cfg=cfg, **state) if cfg.exp_manager.resume_if_exists else None
    first_step = resumed["step"] + 1 if resumed else 1
    if resumed:
        log(f"resumed from {checkpoints / checkpointing.step_dir_name(resumed['step'])}")

    result, batches = TrainResult(), iter(train_loader)

    def evaluate(step: int) -> Dict[str, float]:
        metrics = result.evals[step] = evaluate_retrieval(model, val_loader(), device, autocast, distributed.dp_group())
        log(f"eval step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    started = window_start = time.time()
    window_first_step = first_step
    for step in range(first_step, t.max_steps + 1):
        images, tokens = next(batches)
        with autocast:
            loss = loss_fn(*model(images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)))
        loss.backward()
        optimizer.finish_gradients(m.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        result.step = step
        result.losses.append(loss.item())

        if step % t.log_every_n_steps == 0 or step == t.max_steps:
            now = time.time()
            rate = (step - window_first_step + 1) * m.global_batch_size / (now - window_start)
            eta = (now - started) / step * (t.max_steps - step)
            log(f"step {step}/{t.max_steps} loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.3e} "
                f"samples/s {rate:.1f} eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            window_start, window_first_step = now, step + 1
        if step % t.val_check_interval == 0 and step != t.max_steps:
            evaluate(step)
        every = cfg.exp_manager.checkpoint.every_n_steps
        if (every and step % every == 0) or step == t.max_steps:
            checkpointing.save(checkpoints, step, cfg=cfg, consumed_samples=step * m.global_batch_size,
                               keep=cfg.exp_manager.checkpoint.save_top_k, **state)

    result.step = max(result.step, first_step - 1)
    final = evaluate(result.step)
    log(f"final: step={result.step} loss={result.losses[-1] if result.losses else float('nan'):.4f} i2t_R@1={final['i2t_R@1']:.4f} "
        f"t2i_R@1={final['t2i_R@1']:.4f} chance_R@1={final['chance_R@1']:.4f}")
    return result


def main(cfg, world_size: int) -> int:
    try:
        train(cfg, world_size)
    except (ConfigError, CheckpointError) as e:
        print(f"megaclip: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0

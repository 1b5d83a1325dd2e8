"""What a user watches during training: a progress line per log interval, TensorBoard scalars under
the experiment directory, the resolved config saved at the start, and a PNG of loss and eval metrics
over steps at the end. Every rank may call it; only global rank 0 prints or writes.
"""
from __future__ import annotations

import json
import os
import resource
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch
from omegaconf import OmegaConf

from megaclip import distributed

CONFIG_FILE, TENSORBOARD_DIR, PLOT_FILE = "config.yaml", "tensorboard", "training_curves.png"
STEP_LOG = "steps.jsonl"  # one line per step, the loss at full precision (resumed runs append)


def peak_memory_bytes() -> int:
    """Peak device memory allocated by torch on GPU; the process's peak resident set on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_duration(seconds: float) -> str:
    days, rest = divmod(int(max(seconds, 0)), 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {clock}" if days else clock


def format_metrics(metrics: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


class TrainingMonitor:
    """step(...) after every optimizer step, evaluation(...) after every eval, close() at the end."""

    def __init__(self, cfg, *, exp_dir: str, max_steps: int, global_batch_size: int, devices: int,
                 log_every: int, start_step: int = 0, enabled: Optional[bool] = None):
        self.enabled = distributed.is_main() if enabled is None else enabled
        self.exp_dir, self.max_steps, self.log_every = exp_dir, max_steps, log_every
        self.global_batch_size, self.devices = global_batch_size, devices
        self.start_step = self.window_step = start_step
        self.started = self.window_start = time.perf_counter()
        self.data_wait = 0.0  # seconds spent waiting for batches since the last progress line
        self.losses: Dict[int, float] = {}  # every step's loss, up to the last log step (on every rank)
        self.pending: List[tuple] = []  # the steps since: their values may still be on the device
        self.evals: Dict[int, Dict[str, float]] = {}
        self.writer = None
        if self.enabled:
            os.makedirs(exp_dir, exist_ok=True)
            OmegaConf.save(cfg, os.path.join(exp_dir, CONFIG_FILE), resolve=True)
            if cfg.exp_manager.create_tensorboard_logger:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(exp_dir, TENSORBOARD_DIR))

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def timed(self, batches: Iterator) -> Iterator:
        """batches, with the time spent waiting for each counted as data wait."""
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - start
            yield batch

    def step(self, step: int, *, loss, lr: float, skipped: Callable[[], Dict[str, int]],
             nonfinite=0, terms: Optional[Dict[str, float]] = None) -> Optional[str]:
        """Record a step; on log steps print (and return) the progress line. skipped() gives the bad
        input skipped so far by kind; every rank calls it on log steps, so it may be a collective
        (e.g. lambda: loader.skipped_across_ranks(train_loader, device, dp_group)). nonfinite: steps
        of this run whose update was skipped for a non-finite loss or gradient norm. terms: the
        objective's named parts of the loss, logged as loss_<name> (on the progress line only when
        there is more than one: a single term is the loss itself). loss, nonfinite and the terms may
        be device tensors: they are read back to the host together on log steps (and at close), so
        the steps between need no device sync; steps.jsonl gets their lines then."""
        log_step = step % self.log_every == 0 or step == self.max_steps
        counts = skipped() if log_step else {}
        self.pending.append((step, loss, nonfinite, terms or {}, lr))
        if not log_step:
            return None
        rows = self.flush()
        if not self.enabled:
            return None
        loss, nonfinite, named = rows[-1]
        now = time.perf_counter()
        window = max(now - self.window_start, 1e-9)
        rate = (step - self.window_step) * self.global_batch_size / window
        wait = self.data_wait / window
        eta = (now - self.started) / max(step - self.start_step, 1) * (self.max_steps - step)
        parts = "".join(f"{name} {value:.4f} " for name, value in named.items()) if len(named) > 1 else ""
        line = (f"step {step}/{self.max_steps} loss {loss:.4f} {parts}lr {lr:.3e} samples/s {rate:.1f} "
                f"({rate / self.devices:.1f}/gpu) data-wait {100 * wait:.1f}% "
                f"skipped {sum(counts.values())} {f'nonfinite {nonfinite} ' if nonfinite else ''}mem {peak_memory_bytes() / 2**30:.2f}GiB eta {format_duration(eta)}")
        print(line, flush=True)
        for name, value in (("samples_per_sec", rate), ("samples_per_sec_per_gpu", rate / self.devices),
                            ("data_wait_fraction", wait)):
            self.scalar(f"train/{name}", value, step)
        for kind, count in counts.items():
            self.scalar(f"data/skipped_{kind}", count, step)
        self.window_start, self.window_step, self.data_wait = now, step, 0.0
        return line

    def flush(self) -> List[tuple]:
        """Read the pending steps' values back to the host with one copy, write their lines; returns
        (loss, nonfinite, named terms) per step."""
        if not self.pending:
            return []
        values = [v for _, loss, nonfinite, terms, _ in self.pending for v in (loss, nonfinite, *terms.values())]
        tensors = [v.detach().double().reshape(()) for v in values if torch.is_tensor(v)]  # float64: fp32 exactly
        read_back = iter(torch.stack(tensors).tolist() if tensors else [])
        read = iter([next(read_back) if torch.is_tensor(v) else v for v in values])
        rows = []
        for step, _, _, terms, lr in self.pending:
            loss, nonfinite = next(read), int(next(read))
            named = {f"loss_{name}": next(read) for name in terms}
            self.losses[step] = loss
            rows.append((loss, nonfinite, named))
            if self.enabled:
                with open(os.path.join(self.exp_dir, STEP_LOG), "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss, **named, "lr": lr, "nonfinite": nonfinite}) + "\n")
                for name, value in {"loss": loss, **named, "lr": lr}.items():
                    self.scalar(f"train/{name}", value, step)
        self.pending = []
        return rows

    def evaluation(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.evals.setdefault(step, {}).update(metrics)
        for name, value in metrics.items():
            self.scalar(f"eval/{name}", value, step)
        print(f"eval step {step}: {format_metrics(metrics)}", flush=True)

    def close(self) -> None:
        self.flush()
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        self.plot(os.path.join(self.exp_dir, PLOT_FILE))

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a training node
        import matplotlib.pyplot as plt

        fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
        loss_ax.plot(list(self.losses), list(self.losses.values()), linewidth=1)
        loss_ax.set(xlabel="step", ylabel="loss", title="training loss")
        # fractions on one axis; mean ranks and image counts live on other scales (TensorBoard has them)
        names: List[str] = sorted({k for m in self.evals.values() for k in m if not k.endswith(("mean_rank", "images"))})
        for name in names:
            steps = [s for s in self.evals if name in self.evals[s]]
            eval_ax.plot(steps, [self.evals[s][name] for s in steps], marker="o", label=name)
        eval_ax.set(xlabel="step", ylabel="fraction", title="evaluation", ylim=(0, 1))
        if names:
            eval_ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

"""What the loop decides once per step, alike on every rank: whether the step's update is applied (a
non-finite loss or gradient norm skips it, too many in a row stop the run), whether a stop signal
(SIGTERM, SIGUSR1: preemption) asks the run to save and exit, and whether the wall-clock interval
for a periodic checkpoint has passed.

Each rank sees only its own part of that: its loss (the local loss differs by DP rank), the signals
that reached it (a signal reaches ranks at different moments, or only some of them), its own clock.
So every rank contributes its flags and the world takes their maximum: one small all-reduce per
step on the device (the non-finite flag; the other two only on the steps the host reads). The step's skip never leaves the device: the fused AdamW kernel takes it as its
``found_inf`` and leaves weights, moments and step count as they were. The host reads the flags and
the counts only on the steps the loop asks it to (``read``: every trainer.sync_every_n_steps, log
and checkpoint steps), so a stop signal or a due wall-clock save takes effect at the first such step
after it, on every rank alike: up to sync_every_n_steps (default 5) steps later, which with the
checkpoint write must fit in the launcher's grace period (torchrun's --shutdown-timeout, 30 s by
default). A streak of non-finite steps too long is noticed there too; the steps in between skip
their updates as they come, on the device.

A skipped step still counts as a step, as with AMP's GradScaler: the step counter, the LR schedule
and the data move on, only the optimizer does not step (its moments and Adam step count stay).
"""
from __future__ import annotations

import atexit
import multiprocessing
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# The LR schedule advances without an optimizer step on purpose: on a skipped step, and when a resume
# sets it to the saved step. torch warns about that order once per scheduler; here it is no mistake.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


class NonFiniteError(RuntimeError):
    """The run cannot go on: too many non-finite steps in a row, or non-finite weights at a save."""


_received: Optional[str] = None  # the name of the first stop signal this process got


def install_stop_handlers() -> None:
    """Handlers that only note a stop signal; the loop saves and exits at the next step boundary.
    Installed in the training process as early as possible (a signal during start-up still counts)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _note)
    atexit.register(_end_loader_workers)


def _end_loader_workers() -> None:
    """Loader workers ignore the stop signals (ignore_stop_signals), and so also the SIGTERM with which
    multiprocessing ends daemonic children at exit before it joins them: a loader left running by an
    error would hold the exit forever. Registered after multiprocessing's exit handler, this runs first."""
    # torch's SIGCHLD handler would report these deaths as a failed loader, a traceback after the line
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def _note(signum, frame) -> None:
    global _received
    _received = _received or signal.Signals(signum).name


def stop_signal_received() -> Optional[str]:
    return _received


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """For data-loader workers (a worker_init_fn): the signal that preempts a job reaches every
    process of it, and a loader worker that died of it would fail the step the run wants to finish;
    a worker still ends with its loader, or with its parent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class Verdict:
    skip: torch.Tensor  # on the device, 1.0: a non-finite step whose update is not applied
    nonfinite_steps: torch.Tensor  # on the device: steps of this run skipped so far, this one included
    stop: bool = False  # a stop signal reached some rank: save at this step and exit (read steps only)
    save_due: bool = False  # every_n_minutes have passed since the last save, by rank 0's clock (read steps only)


class StepGuard:
    def __init__(self, *, max_consecutive_nonfinite: int, every_n_minutes: float, device: torch.device):
        self.max_consecutive, self.device = max_consecutive_nonfinite, device
        self.save_interval_s = every_n_minutes * 60
        self.last_save = time.monotonic()
        # on the device: [non-finite steps in this run (a resumed run counts afresh), in a row now,
        # the step at which a streak first reached max_consecutive (0: none)]
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)  # float64: any step number exactly
        self.nonfinite_steps = self.consecutive = 0  # the counts as of the last read

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, read: bool = True) -> Verdict:
        """Called between the gradient reduction and the optimizer step, on every rank (a collective).
        The gradient norm is the same on every rank already; the loss and the rest are not. Only with
        ``read`` does the host look at the outcome (and raise NonFiniteError for a streak too long)."""
        nonfinite = torch.logical_not(torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm).all())
        flags = nonfinite.to(self.device, torch.float32).reshape(1)
        if read:  # the host's flags, only where the host will look (a copy to the device is no sync)
            clock_due = (self.save_interval_s > 0 and dist.get_rank() == 0
                         and time.monotonic() - self.last_save >= self.save_interval_s)
            host = torch.tensor([float(stop_signal_received() is not None), float(clock_due)])
            flags = torch.cat([flags, host.to(self.device, non_blocking=True)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip, (total, row, tripped) = flags[0], self.counts
        row = (row + 1) * skip
        tripped = torch.where((tripped == 0) & (row >= self.max_consecutive), float(step), tripped)
        self.counts = torch.stack([total + skip, row, tripped])
        verdict = Verdict(skip=skip, nonfinite_steps=self.counts[0])
        if not read:
            return verdict
        _, stop, save_due, total, row, tripped = torch.cat([flags, self.counts]).tolist()  # the host read
        self.nonfinite_steps, self.consecutive = int(total), int(row)
        if tripped:
            first = int(tripped) - self.max_consecutive + 1
            raise NonFiniteError(
                f"non-finite loss or gradient norm in {self.max_consecutive} consecutive steps "
                f"({first} to {int(tripped)}; trainer.max_consecutive_nonfinite={self.max_consecutive}): "
                f"stopped at step {step} without saving; lower model.optim.lr or check the data, then resume")
        verdict.stop, verdict.save_due = bool(stop), bool(save_due)
        return verdict

    def saved(self) -> None:
        self.last_save = time.monotonic()


def require_finite(step: int, state: Dict, device: torch.device) -> None:
    """Raise NonFiniteError on every rank if any rank's ``state`` (nested dicts of tensors) holds a
    NaN or inf (a collective): a checkpoint is never written from non-finite weights or optimizer
    state, so it can never replace or push out a good one."""
    bad = _first_nonfinite(state)
    flag = torch.tensor(float(bad is not None), device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = f" ({bad} on this rank)" if bad else " (on another rank)"
        raise NonFiniteError(f"step {step}: the weights or optimizer state are not finite{where}: "
                             "checkpoint not written, the previous one is kept")


def _first_nonfinite(tree, path: str = "") -> Optional[str]:
    if torch.is_tensor(tree):
        return path if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = _first_nonfinite(value, f"{path}.{key}" if path else str(key))
            if found:
                return found
    return None

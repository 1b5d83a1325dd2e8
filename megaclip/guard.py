"""What the loop decides once per step, alike on every rank: whether the step's update is applied (a
non-finite loss or gradient norm skips it, too many in a row stop the run), whether a stop signal
(SIGTERM, SIGUSR1: preemption) asks the run to save and exit, and whether the wall-clock interval
for a periodic checkpoint has passed.

Each rank sees only its own part of that: its loss (the local loss differs by DP rank), the signals
that reached it (a signal reaches ranks at different moments, or only some of them), its own clock.
So every rank contributes three flags and the world takes their maximum: one small all-reduce per
step, read back with one host sync; the loop reads the loss back every step anyway.

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
    finite: bool  # apply this step's update
    stop: bool  # a stop signal reached some rank: save at this step and exit
    save_due: bool  # every_n_minutes have passed since the last save (rank 0's clock)


class StepGuard:
    def __init__(self, *, max_consecutive_nonfinite: int, every_n_minutes: float, device: torch.device):
        self.max_consecutive, self.device = max_consecutive_nonfinite, device
        self.save_interval_s = every_n_minutes * 60
        self.last_save = time.monotonic()
        self.nonfinite_steps = 0  # in this run (a resumed run counts afresh)
        self.consecutive = 0

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> Verdict:
        """Called between the gradient reduction and the optimizer step, on every rank (a collective).
        The gradient norm is the same on every rank already; the loss and the rest are not."""
        clock_due = (self.save_interval_s > 0 and dist.get_rank() == 0
                     and time.monotonic() - self.last_save >= self.save_interval_s)
        nonfinite = torch.logical_not(torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm).all())
        flags = torch.stack([nonfinite.to(self.device, torch.float32),
                             torch.tensor(float(stop_signal_received() is not None), device=self.device),
                             torch.tensor(float(clock_due), device=self.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop, save_due = (bool(f) for f in flags.tolist())
        if nonfinite:
            self.nonfinite_steps += 1
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteError(
                    f"non-finite loss or gradient norm in {self.consecutive} consecutive steps "
                    f"({step - self.consecutive + 1} to {step}; trainer.max_consecutive_nonfinite={self.max_consecutive}): "
                    f"stopped at step {step} without saving; lower model.optim.lr or check the data, then resume")
        else:
            self.consecutive = 0
        return Verdict(finite=not nonfinite, stop=stop, save_due=save_due)

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

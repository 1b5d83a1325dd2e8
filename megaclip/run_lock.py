"""One run per experiment directory: global rank 0 holds ``<exp_dir>/run.lock`` from just after the
process group starts until the process exits, and a second run on the same directory stops with one
line naming the holder, before it writes anything there.

The lock is a file created with O_CREAT | O_EXCL rather than an fcntl/flock lock: exclusive creation
is atomic on local disks and on the network filesystems clusters share between nodes (NFSv3+, Lustre,
GPFS), whereas flock/fcntl locks are node-local on some of those mounts (Lustre's ``localflock``, NFS
without lockd) and would let a run on another node through without a word. The price is that a holder
which died leaves its file behind, so the file says who holds it (host, pid, start time, SLURM job) and
the holder refreshes its mtime every ``HEARTBEAT_S`` (a heartbeat). A lock is stale, and is taken over
with a line saying so, when
- it names this host (and pid namespace) and that process is gone;
- it names an earlier start of this SLURM job (a requeued job, maybe on another node: SLURM ended the
  old one before requeueing it);
- its heartbeat is older than ``STALE_AFTER_S`` (a holder on another host that died; a reused pid).
The heartbeat also checks that the file still names this run; if another run took it over (this one
was frozen past the staleness limit), this run stops at once rather than write beside it.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Optional

import torch.distributed as dist

from megaclip import errors
from megaclip.config import ConfigError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats: generous for clock skew and NFS attribute caching


class ExperimentDirInUse(ConfigError):
    """Another run holds the experiment directory, or its lock file cannot be written (exit code 2)."""


def _pid_namespace() -> str:
    try:  # two containers on one host share its name but not their pids
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _identity() -> Dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "token": uuid.uuid4().hex}


def _parse(text: Optional[str]) -> Optional[Dict]:
    """The holder a lock file names; None if it is empty or cut short (its writer is starting now, or
    died while writing)."""
    try:
        holder = json.loads(text or "")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: Optional[Dict]) -> str:
    if holder is None:
        return "a run that is starting (the lock file is not written yet)"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}{job}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _exit_on_loss(message: str) -> None:
    print(f"megaclip: error: {message}", file=sys.stderr, flush=True)
    # From the heartbeat thread, at once: nothing more may be written beside the new holder, and the
    # lock is not this run's to release.
    os._exit(errors.BAD_INPUT)


class RunLock:
    def __init__(self, exp_dir, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                 on_loss: Callable[[str], None] = _exit_on_loss):
        self.exp_dir, self.path = Path(exp_dir), Path(exp_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s, self.on_loss = heartbeat_s, stale_after_s, on_loss
        self.identity = _identity()
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a line to print if a stale lock was taken over. Raises
        ExperimentDirInUse if a live run holds it."""
        taken_over = None
        for _ in range(5):  # a few rounds: runs that start together contend for a stale lock
            try:
                self.exp_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                text, age = self._read()
                if text is None:  # released in between
                    continue
                reason = self._stale_reason(_parse(text), age)
                if reason is None:
                    raise ExperimentDirInUse(f"experiment directory {self.exp_dir} is in use by {describe(_parse(text))} "
                                             f"(lock file {self.path}); use another exp_manager.exp_dir or stop that run")
                self._break(text)
                taken_over = f"took over the lock of {self.exp_dir}: {reason}"
                continue
            except OSError as e:
                raise ExperimentDirInUse(f"cannot create the lock file {self.path}: {e.strerror}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.identity, f)
                f.flush()
                os.fsync(f.fileno())
            return taken_over
        raise ExperimentDirInUse(f"could not take the lock {self.path}: other runs keep taking it")

    def _read(self):
        try:
            return self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0

    def _stale_reason(self, holder: Optional[Dict], age: float) -> Optional[str]:
        if holder is None:
            return f"an unreadable lock file {age:.0f} s old" if age > self.stale_after_s else None
        me, who = self.identity, describe(holder)
        if (holder.get("host"), holder.get("pid_namespace")) == (me["host"], me["pid_namespace"]):
            if _process_gone(holder["pid"]):
                return f"{who}: that process is gone"
        elif (holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]
              and holder.get("slurm_restart_count", 0) < me["slurm_restart_count"]):
            return f"{who}: an earlier start of this requeued job"
        if age > self.stale_after_s:
            return f"{who}: no heartbeat for {age / 60:.0f} min"
        return None

    def _break(self, seen: str) -> None:
        """Remove the stale lock ``seen``, unless another run replaced it in the meantime: moved aside
        first, so that of two runs breaking it at once only one removes it."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.identity['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != seen:  # a fresh lock taken in between: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink()

    def holds(self) -> bool:
        holder = _parse(self._read()[0])
        return holder is not None and holder.get("token") == self.identity["token"]

    def start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.holds():
                    text = self._read()[0]
                    holder = "nobody (it was removed)" if text is None else describe(_parse(text))
                    self.on_loss(f"lost the lock of {self.exp_dir}: it now names {holder}; stopping so as not to "
                                 "write beside that run")
                    return
                os.utime(self.path)  # times=None: the file server's clock on NFS, like the readers' view
            except OSError:  # a passing filesystem error (NFS): the next beat tries again, well before staleness
                continue

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self.holds():
            self.path.unlink()


def hold_for_run(exp_dir) -> None:
    """Called by every rank right after the process group starts (a collective): global rank 0 takes
    the lock and keeps it, with its heartbeat, until the process exits (atexit: after a return, an
    exception, or a stop signal's orderly exit); every rank raises ExperimentDirInUse if it failed."""
    outcome = [None]
    if dist.get_rank() == 0:
        lock = RunLock(exp_dir)
        try:
            note = lock.acquire()
        except ExperimentDirInUse as e:
            outcome = [str(e)]
        else:
            lock.start_heartbeat()
            atexit.register(lock.release)
            if note:
                print(note, flush=True)
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise ExperimentDirInUse(outcome[0])

"""One run per experiment directory: the lock's rules one by one, then two whole runs on one directory."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from megaclip import run_lock
from megaclip.run_lock import ExperimentDirInUse, RunLock
from tests.processes import workers_of
from tests.test_resume import ENV, ROOT, command


def write_holder(exp_dir, age_s: float = 0.0, **fields):
    """A lock file as another run would have left it, its heartbeat ``age_s`` old."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": run_lock._pid_namespace(),
              "started": "2026-01-01 00:00:00 UTC", "slurm_job_id": None, "slurm_restart_count": 0, "token": "other"}
    path = exp_dir / run_lock.LOCK_FILE
    exp_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder | fields))
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_stops_a_second_run_and_is_released(tmp_path):
    first = RunLock(tmp_path / "run")
    assert first.acquire() is None
    with pytest.raises(ExperimentDirInUse, match=rf"in use by pid {os.getpid()} on {re.escape(socket.gethostname())}, started "):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / run_lock.LOCK_FILE).exists()
    second = RunLock(tmp_path / "run")
    assert second.acquire() is None
    first.release()  # a release by a run that no longer holds the lock leaves the holder's file alone
    assert second.holds()


@pytest.mark.parametrize("holder, reason", [
    (dict(pid="dead"), "that process is gone"),
    (dict(host="node-7", pid=1), None),  # another host, heartbeat fresh: honoured whatever its pid
    (dict(host="node-7", pid=1, age_s=run_lock.STALE_AFTER_S + 60), "no heartbeat for 11 min"),
    (dict(age_s=run_lock.STALE_AFTER_S + 60), "no heartbeat for 11 min"),  # this host, a live (reused) pid
])
def test_stale_locks_are_taken_over_and_live_ones_honoured(tmp_path, holder, reason):
    write_holder(tmp_path, **(holder | {"pid": dead_pid()} if holder.get("pid") == "dead" else holder))
    lock = RunLock(tmp_path)
    if reason is None:
        with pytest.raises(ExperimentDirInUse, match=r"in use by pid 1 on node-7, started 2026-01-01 00:00:00 UTC"):
            lock.acquire()
    else:
        note = lock.acquire()
        assert note.startswith(f"took over the lock of {tmp_path}: pid ") and note.endswith(reason)
        assert lock.holds()


@pytest.mark.parametrize("restart_count, taken_over", [(0, True), (1, False)])
def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_start(tmp_path, monkeypatch, restart_count, taken_over):
    # requeued: another node, the old lock's heartbeat still fresh; the same start (another srun step
    # of the job writing to the same directory) is a second run like any other
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_holder(tmp_path, host="node-7", pid=1, slurm_job_id="4242", slurm_restart_count=restart_count)
    lock = RunLock(tmp_path)
    if taken_over:
        assert lock.acquire().endswith("SLURM job 4242: an earlier start of this requeued job")
    else:
        with pytest.raises(ExperimentDirInUse, match="SLURM job 4242"):
            lock.acquire()


def test_the_heartbeat_refreshes_the_lock_and_stops_a_run_that_lost_it(tmp_path):
    lost = []
    lock = RunLock(tmp_path, heartbeat_s=0.05, on_loss=lost.append)
    lock.acquire()
    path = tmp_path / run_lock.LOCK_FILE
    os.utime(path, (time.time() - 3600,) * 2)
    lock.start_heartbeat()
    deadline = time.time() + 10
    while time.time() - path.stat().st_mtime > 60:
        assert time.time() < deadline
        time.sleep(0.01)
    write_holder(tmp_path, host="node-7", pid=1)  # taken over while this run was frozen past the limit
    while not lost:
        assert time.time() < deadline
        time.sleep(0.01)
    assert lost == [f"lost the lock of {tmp_path}: it now names pid 1 on node-7, started 2026-01-01 00:00:00 UTC; "
                    "stopping so as not to write beside that run"]
    lock.release()
    assert path.exists()  # the new holder's


def test_breaking_a_stale_lock_spares_a_fresh_one_taken_meanwhile(tmp_path):
    stale = write_holder(tmp_path, pid=dead_pid()).read_text()
    fresh = write_holder(tmp_path, host="node-7", pid=1).read_text()  # another run broke it first
    RunLock(tmp_path)._break(stale)
    assert (tmp_path / run_lock.LOCK_FILE).read_text() == fresh
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_lock.LOCK_FILE]


def test_a_second_run_on_a_directory_in_use_stops_with_one_line(tmp_path):
    data, exp_dir = tmp_path / "data", tmp_path / "run"
    first = subprocess.Popen(command(data, exp_dir, "tp=1", "steps=40", nproc=1), cwd=ROOT, env=ENV, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.time() + 300
        while not (exp_dir / "steps.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, "the first run ended before the second started"
            time.sleep(0.05)
        # Freeze the first run while the second starts, so that it is surely still running (gloo's
        # timeout and the lock's staleness limit are minutes away).
        workers = list(workers_of(first.pid).values())
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        holder = json.loads((exp_dir / run_lock.LOCK_FILE).read_text())
        logged = (exp_dir / "steps.jsonl").read_text()

        # two processes: rank 1 must learn that rank 0 found the directory in use
        second = subprocess.run(command(data, exp_dir, "tp=1"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        line = (f"experiment directory {exp_dir} is in use by pid {holder['pid']} on {holder['host']}, started "
                f"{holder['started']} (lock file {exp_dir / run_lock.LOCK_FILE}); use another exp_manager.exp_dir or stop that run")
        errors = re.findall(r"^megaclip: error: (?:rank \d+: )?(.*)", second.stderr, re.MULTILINE)
        assert f"megaclip: error: {line}" in second.stderr.splitlines() and set(errors) == {line}, second.stderr[-3000:]
        assert "exitcode  : 2" in second.stderr  # every worker's exit code, in torchrun's summary
        assert (exp_dir / "steps.jsonl").read_text() == logged
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        if sys.exc_info()[0] is not None:
            os.killpg(first.pid, signal.SIGKILL)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert out.splitlines()[-1].startswith("final: step=40 ")
    steps = [json.loads(line)["step"] for line in (exp_dir / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # each step once
    assert not (exp_dir / run_lock.LOCK_FILE).exists()  # released at exit

"""A rank that stops answering (SIGSTOP: what a hung GPU, a swapping node or a debugger looks like to
its peers) ends its peers within the collective timeout, with one line naming the wait, and so the
whole job, instead of hanging it forever."""
import os
import re
import signal
import subprocess
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from megaclip import distributed, errors
from megaclip.data import prepare
from tests.distributed import run_distributed
from tests.helpers import small_config
from tests.processes import of_run, start_ranks
from tests.test_resume import ENV, ROOT, run_args

# trainer.collective_timeout_s: above the start-up skew between ranks on a busy 2-core machine (rank 0
# alone writes the config and, here not, starts TensorBoard before the first step's collective)
TIMEOUT_S = 15
MARGIN_S = 30  # the failing rank's exit (its loader, atexit) on a loaded machine


def test_a_stopped_rank_ends_its_peer_with_one_line(tmp_path):
    # The ranks are started without torchrun: what is tested is that the rank left waiting gives up in
    # time, says so once and leaves nothing behind; torchrun then ends the job as for any failed worker
    # (tests/test_errors.py), after 30 s of its own for the stopped rank, which cannot act on SIGTERM.
    exp_dir, logs = tmp_path / "run", [tmp_path / f"stderr_{rank}.txt" for rank in range(2)]
    args = run_args(tmp_path / "data", exp_dir, "tp=1", "steps=100000", "model.data.num_workers=1",
                    "exp_manager.create_tensorboard_logger=false", f"trainer.collective_timeout_s={TIMEOUT_S}")
    ranks = start_ranks(2, args, ENV, logs, cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True)
    log = lambda: "".join(f.read_text() for f in logs)
    try:
        deadline = time.time() + 300
        while not ((exp_dir / "steps.jsonl").exists() and len((exp_dir / "steps.jsonl").read_text().splitlines()) >= 2):
            assert all(r.poll() is None for r in ranks) and time.time() < deadline, log()[-2000:]
            time.sleep(0.1)
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.time()
        returncode = ranks[0].wait(timeout=TIMEOUT_S + MARGIN_S)
        elapsed = time.time() - stopped

        assert returncode == errors.COLLECTIVE_FAILED, log()[-3000:]
        assert elapsed < TIMEOUT_S + MARGIN_S
        errors_said = re.findall(r"^megaclip: error: .*", log(), re.MULTILINE)
        assert len(errors_said) == 1, log()[-3000:]
        assert re.fullmatch(rf"megaclip: error: no answer from a peer rank within {TIMEOUT_S} s in training at step \d+; "
                            "a rank is stuck or dead", errors_said[0])
        # nothing of rank 0 outlives it, its data-loader worker included (forked: the same command line,
        # killed on rank 0's way out, gone within moments); only the stopped rank and its own are left
        deadline = time.time() + 10
        while process_groups(of_run(exp_dir)) != {ranks[1].pid}:
            assert time.time() < deadline, process_groups(of_run(exp_dir))
            time.sleep(0.1)
        assert not (exp_dir / "run.lock").exists()  # released by rank 0 on its way out
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, signal.SIGKILL)  # the rank and its loader worker, stopped or not
                rank.wait()


def process_groups(pids):
    """The process groups (here: one per rank, started in a session of its own) of the live ``pids``."""
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:  # ended meanwhile
            continue
    return groups


def _all_reduce_after_rank_1_left():
    if dist.get_rank() == 1:
        return None  # this process exits: its connections close
    distributed.doing("evaluation", 7)
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as e:
        return distributed.peer_failure(e)


def test_a_peer_that_exited_is_named_as_a_lost_connection():
    message = run_distributed(_all_reduce_after_rank_1_left, 2)[0]
    assert message == "lost the connection to a peer rank in evaluation at step 7; a rank stopped or died (its own message says why)"


def _generate_while_the_other_waits(synthetic_dir):
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=0.5))  # far below the seconds generating takes
    prepare.ensure_synthetic(small_config(f"model.data.synthetic_dir={synthetic_dir}",
                                          "model.data.synthetic_train_samples=1024").model)
    return prepare.synthetic_status(synthetic_dir)


def test_generating_the_synthetic_set_outlasts_a_short_collective_timeout(tmp_path):
    # rank 0 generates the set while rank 1 waits: a wait of its own, not the run's collective timeout
    assert run_distributed(_generate_while_the_other_waits, 2, 1, str(tmp_path / "synthetic")) == ["complete"] * 2

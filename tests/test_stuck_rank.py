"""A rank that stops answering (SIGSTOP: what a hung GPU, a swapping node or a debugger looks like to
its peers) ends the whole job within the collective timeout, with one line naming the wait, instead of
hanging it forever."""
import os
import re
import signal
import subprocess
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from megaclip import distributed
from megaclip.data import prepare
from tests.distributed import run_distributed
from tests.helpers import small_config
from tests.processes import of_run, workers_of
from tests.test_resume import ENV, ROOT, command

# trainer.collective_timeout_s: above the start-up skew between ranks on a busy 2-core machine (rank 0
# alone writes the config and, here not, starts TensorBoard before the first step's collective)
TIMEOUT_S = 15
# When one worker fails, torchrun sends the others SIGTERM and, 30 s later, SIGKILL (a fixed wait on
# that path in torch 2.13); a stopped process cannot act on SIGTERM, so the job ends after both.
TORCHRUN_KILL_S = 30
MARGIN_S = 30  # the failing rank's exit (its loader, atexit), torchrun's polling and teardown, on a loaded machine


def test_a_stopped_rank_ends_the_job_with_one_line(tmp_path):
    exp_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        launcher = subprocess.Popen(command(tmp_path / "data", exp_dir, "tp=1", "steps=100000", "model.data.num_workers=1",
                                            "exp_manager.create_tensorboard_logger=false", f"trainer.collective_timeout_s={TIMEOUT_S}"),
                                    cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((exp_dir / "steps.jsonl").exists() and len((exp_dir / "steps.jsonl").read_text().splitlines()) >= 2):
            assert launcher.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        os.kill(workers_of(launcher.pid)[1], signal.SIGSTOP)
        stopped = time.time()
        returncode = launcher.wait(timeout=TIMEOUT_S + TORCHRUN_KILL_S + MARGIN_S)
        elapsed = time.time() - stopped

        assert returncode != 0
        assert elapsed < TIMEOUT_S + TORCHRUN_KILL_S + MARGIN_S
        errors = re.findall(r"^megaclip: error: .*", log.read_text(), re.MULTILINE)  # (torchrun's summary quotes it)
        assert len(errors) == 1, log.read_text()[-3000:]
        assert re.fullmatch(rf"megaclip: error: no answer from a peer rank within {TIMEOUT_S} s in training at step \d+; "
                            "a rank is stuck or dead", errors[0])
        assert of_run(exp_dir) == []  # no worker, and no data-loader worker, outlives the job
        assert not (exp_dir / "run.lock").exists()  # released by rank 0 on its way out (exit code 4)
    finally:
        for pid in of_run(exp_dir):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


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

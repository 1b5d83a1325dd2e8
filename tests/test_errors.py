"""Errors a run understands end it with one line, from the rank that met them, and a bounded exit:
under torchrun, and when a checkpoint cannot be written."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megaclip.checkpoint import CheckpointError, latest, read_meta
from megaclip.checkpoint import training as checkpointing
from megaclip.data.samples import DataError
from megaclip.errors import one_line
from tests.distributed import run_distributed
from tests.helpers import SMALL
from tests.test_checkpoint import BATCH, build, saved_state, train_step

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def save_twice_with_a_full_disk_on_rank_1(root):
    cfg, state = build()
    train_step(cfg, state, seed=0)
    checkpointing.save(Path(root), 1, cfg=cfg, consumed_samples=BATCH, keep=2, **saved_state(state))
    real_save = torch.save
    if dist.get_rank() == 1:  # this rank's disk is full: what torch.save writes goes to /dev/full (ENOSPC)
        torch.save = lambda obj, f, **kw: real_save(obj, open("/dev/full", "wb") if hasattr(f, "write") else "/dev/full", **kw)
    try:
        checkpointing.save(Path(root), 2, cfg=cfg, consumed_samples=2 * BATCH, keep=2, **saved_state(state))
    except CheckpointError as e:
        return str(e)
    finally:
        torch.save = real_save
    return None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_full_disk_on_one_rank_fails_the_save_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    # Without the agreement rank 0 would wait at the save's barrier for its collective timeout: the
    # short limit here turns that into a failure instead of a hang.
    messages = run_distributed(save_twice_with_a_full_disk_on_rank_1, 2, 2, str(tmp_path), timeout=120)
    assert messages[0] == messages[1]
    assert re.fullmatch(rf"no space left on device: {re.escape(str(tmp_path))}/step_0000002\.partial/\S+\.pt\.tmp, "
                        r"previous checkpoint step_0000001 is intact", messages[0]), messages[0]
    assert latest(tmp_path).name == "step_0000001"
    assert read_meta(tmp_path / "step_0000001")[0]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]  # the failed .partial is gone


def torchrun(*args):
    """The main job on 2 processes, as README runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megaclip.pretrain", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("megaclip: error:")]


def root_cause(stderr):
    """The launcher summary's root-cause entry: {field: value} (exitcode, traceback, rank, ...)."""
    entry = stderr.split("Root Cause (first observed failure):")[1]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in entry.splitlines()[2:] if " : " in line)}


def test_bad_config_under_torchrun_is_said_once_and_named_as_the_root_cause(tmp_path):
    proc = torchrun("tp=3", f"exp_manager.exp_dir={tmp_path}/run")
    line = "megaclip: error: world size 2 is not divisible by tensor_model_parallel_size 3"
    assert error_lines(proc.stderr) == [line], proc.stderr
    assert proc.returncode == 1  # torchrun's own exit code for any failed worker; the worker's is in its summary
    cause = root_cause(proc.stderr)
    assert cause["exitcode"].startswith("2 ") and cause["traceback"] == line, proc.stderr


def save_a_checkpoint_at_dp2(root, *overrides):
    cfg, state = build(*overrides)
    train_step(cfg, state, seed=0)
    checkpointing.save(Path(root), 1, cfg=cfg, consumed_samples=BATCH, keep=2, **saved_state(state))


def test_checkpoint_error_of_one_rank_is_said_by_that_rank_and_the_job_ends(tmp_path):
    # a run's checkpoint whose per-rank training state is unreadable for rank 1 only: rank 0 loads
    # its own and goes on into the first step's collectives, where it loses rank 1
    small = ["model.text.vocab_size=64"]  # the synthetic set's tokenizer
    run_distributed(save_a_checkpoint_at_dp2, 2, 1, str(tmp_path / "run" / "checkpoints"), *small)
    rank_1_state = tmp_path / "run" / "checkpoints" / "step_0000001" / "train" / "rank_00001.pt"
    rank_1_state.write_bytes(rank_1_state.read_bytes()[:100])
    proc = torchrun(*SMALL, *small, "model.vision.encoder_seq_length=null", "model.optim.name=distributed_fused_adam", "steps=3",
                    f"model.data.synthetic_dir={tmp_path}/data", "model.data.synthetic_train_samples=1025",
                    f"exp_manager.exp_dir={tmp_path}/run")
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"megaclip: error: rank 1: checkpoint file unreadable: {rank_1_state} "), proc.stderr
    assert "[rank0]" not in proc.stderr and "gloo" not in proc.stderr, proc.stderr  # no traceback of the rank that lost it
    cause = root_cause(proc.stderr)
    assert cause["rank"].startswith("1 ") and cause["exitcode"].startswith("2 ") and cause["traceback"] == lines[0], proc.stderr


class _UnusableData(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise DataError("data-parallel rank 1 reader 0: not one usable sample in 20 epochs ({'bad_shards': 20})")


def test_data_error_from_a_loader_worker_keeps_its_one_line():
    # torch re-raises a worker's error in the main process with the worker's traceback as its message
    with pytest.raises(DataError) as caught:
        next(iter(torch.utils.data.DataLoader(_UnusableData(), batch_size=None, num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert one_line(caught.value) == "data-parallel rank 1 reader 0: not one usable sample in 20 epochs ({'bad_shards': 20})"


def test_unusable_train_data_is_said_once(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.tar").write_bytes(b"")
    (tmp_path / "bad" / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    proc = torchrun(f"model.data.train_shards={tmp_path}/bad", f"model.data.synthetic_dir={tmp_path}/data",
                    "model.data.synthetic_train_samples=64", f"exp_manager.exp_dir={tmp_path}/run", "steps=3")
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("megaclip: error: data-parallel rank 0 reader 0: not one usable sample"), proc.stderr
    assert "[rank" not in proc.stderr and root_cause(proc.stderr)["exitcode"].startswith("2 "), proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 7 MiB tmpfs: room for one checkpoint of the test run below (4.4 MiB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_run_on_a_full_disk_ends_with_one_line_and_keeps_its_checkpoint(tmp_path, small_disk):
    run = small_disk / "run"
    proc = torchrun("tp=2", f"model.data.synthetic_dir={tmp_path}/data", "model.data.synthetic_train_samples=64",
                    f"exp_manager.exp_dir={run}", "steps=4", "exp_manager.checkpoint.every_n_steps=2",
                    "trainer.val_check_interval=100", "exp_manager.create_tensorboard_logger=false")
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and re.fullmatch(rf"megaclip: error: no space left on device: {run}/checkpoints/step_0000004\.partial/"
                                            r"\S+\.tmp, previous checkpoint step_0000002 is intact", lines[0]), proc.stderr
    assert root_cause(proc.stderr)["exitcode"].startswith("2 "), proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    assert latest(run / "checkpoints").name == "step_0000002"

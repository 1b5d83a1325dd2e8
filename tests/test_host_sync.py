"""The training step reads nothing back from the device except on log, checkpoint and sync steps
(trainer.sync_every_n_steps): no
``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``/``float()``/``int()`` of a tensor in between, so a
GPU never idles while the host waits for it. On CPU every tensor is the host's, so the test counts
every such read made while the loop is training, by step; it leaves out the reads that make the next
batch (the loader works on host data) and the step seed's draw from torch's CPU generator."""
import multiprocessing as mp
import os
import signal
import traceback

import torch

from megaclip import distributed
from megaclip.config import load_config
from megaclip.guard import NonFiniteError, StepGuard, install_stop_handlers
from tests.distributed import free_port, run_distributed

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
HOST_DATA = (os.sep + os.path.join("megaclip", "data") + os.sep, os.path.join("torch", "utils", "data"), "draw_step_seed")


def record_host_reads(reads):
    """Patch the tensor methods that copy a value to the host to note (activity, step, caller)."""
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            if distributed._activity == "training":
                stack = traceback.extract_stack()[:-1]
                if not any(marker in f"{frame.filename}:{frame.name}" for frame in stack for marker in HOST_DATA):
                    reads.append((distributed._step, _name, f"{stack[-1].filename}:{stack[-1].lineno}"))
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, read)


def train_and_record(overrides, queue):
    from megaclip.train import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    reads = []
    try:
        record_host_reads(reads)
        train(load_config("clip_tiny", overrides), 1)
        queue.put(reads)
    except BaseException:
        queue.put(traceback.format_exc())
    finally:
        distributed.shutdown()


def test_the_step_reads_the_device_only_on_log_checkpoint_and_sync_steps(tmp_path):
    overrides = [f"model.data.synthetic_dir={tmp_path / 'data'}", "model.data.synthetic_train_samples=256",
                 f"exp_manager.exp_dir={tmp_path / 'run'}", "steps=7", "trainer.log_every_n_steps=3", "trainer.sync_every_n_steps=5",
                 "trainer.val_check_interval=1000", "exp_manager.checkpoint.every_n_steps=0",
                 "model.global_batch_size=16"]
    queue = mp.get_context("fork").Queue()
    child = mp.get_context("fork").Process(target=train_and_record, args=(overrides, queue))
    child.start()
    reads = queue.get(timeout=600)
    child.join(timeout=60)
    assert isinstance(reads, list), reads
    steps_read = {step for step, _, _ in reads}
    # log steps 3 and 6, sync step 5 (the guard's flags), and 7: the last, which logs and saves
    assert steps_read <= {3, 5, 6, 7}, [r for r in reads if r[0] not in (3, 5, 6, 7)]
    assert {3, 5, 6, 7} <= steps_read  # the patch sees the reads it should


def guard_between_reads():
    """A stop signal on rank 1 at step 2 and a streak of three NaN losses on rank 0 (steps 3 to 5), with
    the host reading at steps 1, 4 and 6 only."""
    install_stop_handlers()
    guard = StepGuard(max_consecutive_nonfinite=3, every_n_minutes=0, device=torch.device("cpu"))
    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    out = []
    for step in range(1, 7):
        if step == 2 and torch.distributed.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        loss = nan if 3 <= step <= 5 and torch.distributed.get_rank() == 0 else finite
        try:
            verdict = guard.check(step, loss, finite, read=step in (1, 4, 6))
        except NonFiniteError as e:
            out.append(str(e))
            break
        out.append((float(verdict.skip), float(verdict.nonfinite_steps), verdict.stop, guard.consecutive))
    return out


def test_the_guard_agrees_on_device_and_tells_the_host_at_read_steps():
    for out in run_distributed(guard_between_reads, 2, 1):
        # every rank skips the steps of rank 0's NaN as they come (the skip and the count stay on the
        # device); the stop on rank 1 and the host's counts wait for a read step, alike on every rank;
        # the streak that reached the limit at step 5 ends the run at the next read
        assert out[:5] == [(0.0, 0.0, False, 0), (0.0, 0.0, False, 0), (1.0, 1.0, False, 0),
                           (1.0, 2.0, True, 2), (1.0, 3.0, False, 2)]
        assert out[5].startswith("non-finite loss or gradient norm in 3 consecutive steps (3 to 5; "
                                 "trainer.max_consecutive_nonfinite=3): stopped at step 6 without saving")

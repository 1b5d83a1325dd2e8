"""The training step reads nothing back from the device except on log, checkpoint and sync steps
(trainer.sync_every_n_steps): no
``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``/``float()``/``int()`` of a tensor in between, so a
GPU never idles while the host waits for it. On CPU every tensor is the host's, so the test counts
every such read made while the loop is training, by step; it leaves out the reads that make the next
batch (the loader works on host data) and the step seed's draw from torch's CPU generator."""
import multiprocessing as mp
import os
import traceback

import torch

from megaclip import distributed
from megaclip.config import load_config
from tests.distributed import free_port

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

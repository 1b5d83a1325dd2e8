"""The README's main job, end to end: torchrun, 2 processes, tp=2, generated shards, CPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_main_job_trains_far_above_chance(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megaclip.pretrain", "tp=2",
           f"model.data.synthetic_dir={tmp_path}/data", f"exp_manager.exp_dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"final: step=(\d+) loss=([\d.]+) i2t_R@1=([\d.]+) t2i_R@1=([\d.]+) chance_R@1=([\d.]+)", last)
    assert match, last
    step, loss, i2t, t2i, chance = (float(x) for x in match.groups())
    assert step == 300
    assert i2t >= 5 * chance and t2i >= 5 * chance
    assert "step 25/300 loss" in proc.stdout and "samples/s" in proc.stdout and "eta" in proc.stdout
    # megaclip's lines only: no library warnings (megatron-core advises a CUDA setting even on CPU)
    assert proc.stderr == "", proc.stderr[-3000:]

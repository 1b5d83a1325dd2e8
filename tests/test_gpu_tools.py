"""tools/gpu_check.sh on a machine without a GPU: each stage says so in one line and runs its CPU smoke
version, so that the Python parts of the GPU check (tools/check_gpu_equality.py, tools/check_planner.py,
tools/benchmark.py --vs-open-clip) run here: their tables, no timing asserted."""
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    proc = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path_factory.mktemp("no_wheels") / "wheels")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout and "limit (rows above" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
    return proc.stdout


def table_rows(text: str, first_cells):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in first_cells:
            rows[cells[0]] = cells
    return rows


def test_header_and_install_line(output):
    assert re.match(r"gpu_check \d{4}-\d\d-\d\d \d\d:\d\d UTC \| GPU: none \| torch \S+ \(CUDA None\) \| Python 3", output)
    assert "== install: skipped, no " in output
    assert "no GPU: each stage below runs its CPU smoke version" in output


def test_training_steps_stage(output):
    (row,) = table_rows(output, {"cpu bf16 O2"}).values()
    _, reference, loss_diff, grad_diff, tolerance, verdict = row
    assert (reference, tolerance, verdict) == ("cpu fp32", "0.05 / 0.05", "ok")
    assert 0 < float(loss_diff) <= 0.05 and 0 < float(grad_diff) <= 0.05  # bf16 differs from fp32, within bounds


def test_planner_stage(output):
    (row,) = table_rows(output, {"clip_tiny"}).values()
    assert row[1:4] == ["8", "fp32", "fused_adam"] and row[-2:] == ["-", "-"]  # no allocator on CPU
    assert float(row[4]) >= 0


def test_open_clip_comparison_stage(output):
    assert "forward formula / torch FlopCounterMode (one layer per tower): 1.0000" in output
    rows = table_rows(output, {"open_clip", "megaclip"})
    (_, oc_precision, oc_compile, oc_rate, oc_per_gpu, _, _, oc_memory, oc_ratio) = rows["open_clip"]
    (_, mc_precision, _, mc_rate, _, mc_tflops, mc_mfu, _, mc_ratio) = rows["megaclip"]
    assert (oc_precision, mc_precision, oc_compile, oc_memory) == ("fp32", "fp32", "off", "-")
    assert float(oc_rate) > 0 and float(mc_rate) > 0 and oc_per_gpu == oc_rate and mc_ratio == "1"
    # the ratio is megaclip's rate over open_clip's (both printed rounded to 0.1 samples/s)
    assert float(oc_ratio) == pytest.approx(float(mc_rate) / float(oc_rate), rel=0.1 / float(oc_rate) + 1e-3)
    assert float(mc_tflops) > 0 and mc_mfu.endswith("%")
    assert re.search(r"megaclip / fastest open_clip at the same compile setting: compile off [0-9.]+ \(vs fp32\)", output)

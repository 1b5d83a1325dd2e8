"""tools/benchmark.py --vs-open-clip on CPU: a tiny architecture, fp32, compile off, as a smoke test of
the whole table (no timing is asserted); and its FLOP formula against torch's FlopCounterMode."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import vs_open_clip  # noqa: E402  (tools/ is not a package)
from megaclip.config import load_config  # noqa: E402


def test_vs_open_clip_prints_the_table():
    proc = subprocess.run([sys.executable, "tools/benchmark.py", "--vs-open-clip", "--model", "tiny", "--batch", "8",
                           "--compile", "off", "--repeats", "2", "--steps", "1", "--warmup", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "forward formula / torch FlopCounterMode (one layer per tower): 1.0000" in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("open_clip", "megaclip"):
            rows[cells[0]] = cells
    assert set(rows) == {"open_clip", "megaclip"}
    (_, oc_precision, oc_compile, oc_rate, oc_per_gpu, _, _, oc_memory, oc_ratio) = rows["open_clip"]
    (_, mc_precision, _, mc_rate, _, mc_tflops, mc_mfu, _, mc_ratio) = rows["megaclip"]
    assert (oc_precision, mc_precision, oc_compile, oc_memory) == ("fp32", "fp32", "off", "-")
    assert float(oc_rate) > 0 and float(mc_rate) > 0 and oc_per_gpu == oc_rate and mc_ratio == "1"
    # the ratio is megaclip's rate over open_clip's, as printed (each rounded to 0.1 samples/s)
    assert float(oc_ratio) == pytest.approx(float(mc_rate) / float(oc_rate), rel=0.1 / float(oc_rate) + 1e-3)
    assert float(mc_tflops) > 0 and mc_mfu.endswith("%")
    assert re.search(r"megaclip / fastest open_clip at the same compile setting: compile off [0-9.]+ \(vs fp32\)", out)


@pytest.mark.parametrize("overrides", [
    [],
    # other widths per tower, an ffn that is not 4h, two class tokens, quick_gelu
    ["model.vision.hidden_size=48", "model.vision.ffn_hidden_size=80", "model.vision.num_attention_heads=3",
     "model.vision.class_token_length=2", "model.text.encoder_seq_length=12", "model.output_dim=24",
     "model.vision.activation=quick_gelu", "model.text.activation=quick_gelu"],
])
def test_flop_formula_is_what_torch_counts(overrides):
    cfg = load_config("clip_tiny", overrides)
    counted, formula = vs_open_clip.counted_forward_flops(cfg)
    assert formula == counted  # the matmuls of the formula are exactly the ones torch counts
    forward = vs_open_clip.forward_flops_per_sample(cfg.model)
    assert vs_open_clip.training_flops_per_sample(cfg.model) == 3 * forward

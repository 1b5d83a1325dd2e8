"""The FLOP formula of tools/benchmark.py --vs-open-clip against torch's FlopCounterMode (the table
itself runs in tests/test_gpu_tools.py, inside tools/gpu_check.sh's CPU smoke run)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import vs_open_clip  # noqa: E402  (tools/ is not a package)
from megaclip.config import load_config  # noqa: E402


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

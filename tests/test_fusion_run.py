"""A whole run with fusion layers (configs/clip_tiny_fusion.yaml) at TP=2: the ITM and captioning terms
are logged, captioning learns, evaluation re-ranks; the checkpoint joined on one process
(tools/evaluate.py --rerank-k) re-ranks as the TP=2 run did, and the run resumes resharded at TP=1."""
import json
import math
import subprocess

import pytest

from tests.test_resume import ENV, ROOT, command
from tools import evaluate as evaluate_tool

STEPS = 16
KEYS = ["--config-name", "clip_tiny_fusion", "model.fusion.num_layers=1", "model.fusion.rerank_k=4",
        "model.optim.sched.warmup_steps=4", f"exp_manager.checkpoint.every_n_steps={STEPS}"]


def metric(line: str, key: str) -> float:
    return float(line.split(f"{key}=")[1].split()[0])


def test_whole_fusion_run_evaluates_reshards_and_resumes(tmp_path, capsys):
    run, data = tmp_path / "run", tmp_path / "data"
    proc = subprocess.run(command(data, run, "tp=2", *KEYS, f"steps={STEPS}"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = proc.stdout.splitlines()[-1]
    assert final.startswith(f"final: step={STEPS} ") and " chance_R@1=" in final
    assert final.index("chance_R@1=") < final.index("rerank_i2t_R@1=") < final.index("rerank_t2i_R@1=")

    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert all({"loss_contrastive", "loss_itm", "loss_lm"} <= entry.keys() for entry in steps)
    # captioning through the fusion layer learns the captions' template fast: from ~ln(vocabulary) per
    # token (64 ids: 4.16) at the start to well below it
    assert steps[0]["loss_lm"] > 3.5 and steps[-1]["loss_lm"] < 0.85 * steps[0]["loss_lm"], steps

    # the TP=2 checkpoint joined on one process re-ranks the same val split to the same figures: the
    # scores differ by fp32 reorderings only (1e-6 of values ~1), which can swap at most a near tie
    last_eval = [line for line in proc.stdout.splitlines() if line.startswith("eval step")][-1]
    assert evaluate_tool.main(["--checkpoint", str(run / "checkpoints"), "--rerank-k", "4"]) == 0
    joined = [line for line in capsys.readouterr().out.splitlines() if line.startswith("retrieval:")][0]
    for key in ("i2t_R@1", "t2i_R@1", "rerank_i2t_R@1", "rerank_t2i_R@1", "rerank_i2t_R@5"):
        assert metric(joined, key) == pytest.approx(metric(last_eval, key), abs=2 / 432), key

    resumed = subprocess.run(command(data, run, "tp=1", *KEYS, f"steps={STEPS + 1}"), cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{STEPS:07d}'}" in resumed.stdout
    assert resumed.stdout.splitlines()[-1].startswith(f"final: step={STEPS + 1} ")
    assert not math.isnan(metric(resumed.stdout.splitlines()[-1], "rerank_t2i_R@1"))

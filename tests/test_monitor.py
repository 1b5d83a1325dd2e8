"""What a user sees: progress lines, TensorBoard scalars, the saved config, the final plot."""
import os
import json
import re
import time

from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megaclip.monitor import TrainingMonitor, format_duration
from tests.helpers import small_config


def test_monitor_reports_progress_and_writes_its_files(tmp_path, capsys):
    cfg = small_config("trainer.max_steps=6")
    monitor = TrainingMonitor(cfg, exp_dir=str(tmp_path / "run"), max_steps=6, global_batch_size=32, devices=4,
                              log_every=3, enabled=True)
    assert OmegaConf.load(tmp_path / "run" / "config.yaml") == cfg

    def slow_batches():
        for i in range(6):
            time.sleep(0.02)  # the loader keeps the step waiting
            yield i

    lines, asked = [], []
    for step, _ in enumerate(monitor.timed(slow_batches()), start=1):
        time.sleep(0.02)  # the step itself
        skipped = lambda: asked.append(step) or {"bad_images": step, "bad_shards": 1}
        lines.append(monitor.step(step, loss=2.0 / step, lr=1e-3 * step, skipped=skipped))
        if step == 3:
            monitor.evaluation(step, {"i2t_R@1": 0.25, "t2i_mean_rank": 7.0, "zeroshot_top1": 0.5})
    monitor.evaluation(6, {"i2t_R@1": 0.5, "t2i_mean_rank": 3.0, "zeroshot_top1": 0.75, "zeroshot_images": 40})
    monitor.close()

    assert [line is None for line in lines] == [True, True, False, True, True, False]
    assert asked == [3, 6]  # skip counts are gathered on log steps only
    match = re.fullmatch(r"step 3/6 loss 0\.6667 lr 3\.000e-03 samples/s ([\d.]+) \(([\d.]+)/gpu\) "
                         r"data-wait ([\d.]+)% skipped 4 mem ([\d.]+)GiB eta (\d\d:\d\d:\d\d)", lines[2])
    assert match, lines[2]
    rate, per_gpu, wait = (float(match.group(i)) for i in (1, 2, 3))
    # 3 steps of 32 samples took at least the 0.12 s slept, and (on a busy machine too) far less than 3 s
    assert 3 * 32 / 3 < rate < 3 * 32 / 0.12 and abs(per_gpu - rate / 4) <= 0.06  # both printed to 0.1
    assert 15 < wait < 85  # about half of each step is spent waiting for data
    assert float(match.group(4)) > 0  # peak memory
    assert lines[5].startswith("step 6/6 loss 0.3333") and "skipped 7 mem" in lines[5] and lines[5].endswith("eta 00:00:00")
    printed = capsys.readouterr().out.splitlines()
    assert printed == [lines[2], "eval step 3: i2t_R@1=0.2500 t2i_mean_rank=7.0000 zeroshot_top1=0.5000",
                       lines[5], "eval step 6: i2t_R@1=0.5000 t2i_mean_rank=3.0000 zeroshot_top1=0.7500 zeroshot_images=40"]

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = lambda tag: [(e.step, round(e.value, 4)) for e in events.Scalars(tag)]
    assert scalars("train/loss") == [(s, round(2.0 / s, 4)) for s in range(1, 7)]
    assert scalars("eval/i2t_R@1") == [(3, 0.25), (6, 0.5)]
    assert scalars("data/skipped_bad_images") == [(3, 3), (6, 6)]
    assert {"train/lr", "train/samples_per_sec", "train/samples_per_sec_per_gpu", "train/data_wait_fraction",
            "eval/t2i_mean_rank"} <= set(events.Tags()["scalars"])
    with Image.open(tmp_path / "run" / "training_curves.png") as plot:
        assert plot.format == "PNG" and plot.size == (1200, 450)


def test_only_rank_zero_writes(tmp_path, capsys):
    monitor = TrainingMonitor(small_config(), exp_dir=str(tmp_path / "run"), max_steps=2, global_batch_size=8,
                              devices=2, log_every=1, enabled=False)
    asked = []
    assert monitor.step(1, loss=1.0, lr=0.1, skipped=lambda: asked.append(1) or {}) is None
    assert asked == [1]  # other ranks still take part in the collective
    monitor.evaluation(1, {"i2t_R@1": 1.0})
    monitor.close()
    assert not os.path.exists(tmp_path / "run") and capsys.readouterr().out == ""


def test_format_duration():
    assert format_duration(0) == "00:00:00" and format_duration(3725.9) == "01:02:05"
    assert format_duration(2 * 86400 + 61) == "2d 00:01:01"


def test_steps_log_always_and_tensorboard_only_when_asked(tmp_path):
    cfg = small_config("trainer.max_steps=2", "exp_manager.create_tensorboard_logger=false")
    monitor = TrainingMonitor(cfg, exp_dir=str(tmp_path), max_steps=2, global_batch_size=8, devices=1,
                              log_every=1, enabled=True)
    for step in (1, 2):
        monitor.step(step, loss=1.0 / 3 + step, lr=0.1, skipped=dict)
    monitor.close()
    assert not (tmp_path / "tensorboard").exists()
    logged = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [(e["step"], e["loss"]) for e in logged] == [(1, 1.0 / 3 + 1), (2, 1.0 / 3 + 2)]  # full precision

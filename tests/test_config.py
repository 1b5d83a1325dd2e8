"""Bad configurations end with one clear line before any process group starts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaclip.config import ConfigError, config_from_argv, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("world,args,expected", [
    (3, ["tp=3"], "num_attention_heads 4 is not divisible by tensor_model_parallel_size 3"),
    (4, ["tp=4", "model.text.ffn_hidden_size=254"], "model.text.ffn_hidden_size 254 is not divisible"),
    (3, ["tp=2"], "world size 3 is not divisible by tensor_model_parallel_size 2"),
    (3, ["gbs=64"], "global_batch_size 64 is not divisible by data-parallel size 3"),
    (2, ["mbs=16"], "micro_batch_size 16 x data-parallel size 2 != global_batch_size 64"),
    (1, ["model.data.train_shards=/nonexistent/train-{000000..000003}.tar"], "shard file(s) missing, e.g. /nonexistent/train-000000.tar"),
    (1, ["model.vision.bogus=1"], "bogus"),
    (1, ["model.text.tokenizer.library=wordpiece"], "tokenizer.library must be sentencepiece or clip_bpe"),
    (1, ["model.text.tokenizer.model=/nonexistent.model"], "no such file /nonexistent.model"),
    (1, ["model.vision.hidden_size=wide"], "hidden_size"),
    (1, ["--config-name", "no_such_config"], "config file not found"),
    (4, ["--config-name", "clip_g14", "tp=4"], "possible tp: [1, 2, 11, 22]; or use num_attention_heads=16"),
])
def test_bad_config_is_one_clear_line(monkeypatch, world, args, expected):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as e:
        config_from_argv(args)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_too_few_shards_for_epoch_mode_is_a_config_error(monkeypatch, tmp_path):
    for i in range(3):
        (tmp_path / f"train-{i}.tar").write_bytes(b"")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="3 train shards cannot feed 2 data-parallel ranks x 2 loader workers: "
                                          "need at least 4 shards"):
        config_from_argv([f"model.data.train_shards={tmp_path}/train-{{0..2}}.tar", "model.data.num_workers=2"])


def test_aliases_and_dotted_overrides(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = config_from_argv(["tp=2", "model.optim.lr=0.01", "steps=7"])
    assert cfg.model.tensor_model_parallel_size == 2
    assert cfg.model.optim.lr == 0.01
    assert cfg.trainer.max_steps == 7
    assert load_config().model.tensor_model_parallel_size == 1  # the default is untouched


def test_entry_point_rejects_before_process_group():
    # No MASTER_ADDR/PORT: had it reached process-group setup it would fail differently or hang.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASTER_")} | {"WORLD_SIZE": "3", "RANK": "0"}
    proc = subprocess.run([sys.executable, "examples/pretrain_clip.py", "tp=2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "megaclip: error: world size 3 is not divisible by tensor_model_parallel_size 2"]
    assert proc.stdout == ""

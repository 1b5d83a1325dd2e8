"""Bad configurations end with one clear line before any process group starts."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaclip.checkpoint.files import write_meta
from megaclip.config import ConfigError, config_from_argv, load_config
from megaclip.data import prepare

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_cwd(tmp_path_factory, monkeypatch):
    """The configs name relative paths (runs/, data/): checks of them must not see this checkout's runs."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.mark.parametrize("world,args,expected", [
    (3, ["tp=3"], "num_attention_heads 4 is not divisible by tensor_model_parallel_size 3"),
    (1, ["trainer.compile=true", "trainer.compile_backend=inductr"],
     "trainer.compile_backend 'inductr' is not a torch.compile backend here; e.g. inductor"),
    (4, ["tp=4", "model.text.ffn_hidden_size=254"], "model.text.ffn_hidden_size 254 is not divisible"),
    (3, ["tp=2"], "world size 3 is not divisible by tensor_model_parallel_size 2"),
    (3, ["gbs=64"], "global_batch_size 64 is not divisible by data-parallel size 3"),
    (2, ["mbs=24"], "model.micro_batch_size 24 does not divide the per-rank batch 32 (global_batch_size 64 / "
                    "data-parallel size 2): accumulation needs a whole number of micro-batches"),
    (2, ["mbs=64"], "model.micro_batch_size 64 does not divide the per-rank batch 32"),
    (1, ["model.data.train_shards=/nonexistent/train-{000000..000003}.tar"], "shard file(s) missing, e.g. /nonexistent/train-000000.tar"),
    (1, ["model.vision.bogus=1"], "bogus"),
    (1, ["model.text.tokenizer.library=wordpiece"], "tokenizer.library must be sentencepiece or clip_bpe"),
    (1, ["model.text.tokenizer.model=/nonexistent.model"], "no such file /nonexistent.model"),
    (1, ["model.vision.hidden_size=wide"], "hidden_size"),
    (1, ["--config-name", "no_such_config"], "config file not found"),
    (4, ["--config-name", "clip_g14", "tp=4"], "possible tp: [1, 2, 11, 22]; or use num_attention_heads=16"),
    # every key with a range: before anything divides by it (heads, patch_dim) or waits on it (gbs=0 hung)
    (1, ["gbs=0"], "model.global_batch_size must be >= 1, got 0"),
    (1, ["lr=0"], "model.optim.lr must be > 0, got 0.0"),
    (1, ["lr=-1e-3"], "model.optim.lr must be > 0, got -0.001"),
    (1, ["model.optim.betas=[0.9,1.0]"], "model.optim.betas must be two values in [0, 1), got [0.9, 1.0]"),
    (1, ["model.optim.betas=[-0.1,0.98]"], "model.optim.betas must be two values in [0, 1)"),
    (1, ["model.optim.betas=[0.9]"], "model.optim.betas must be two values in [0, 1), got [0.9]"),
    (1, ["model.optim.weight_decay=-0.1"], "model.optim.weight_decay must be >= 0, got -0.1"),
    (1, ["model.optim.sched.warmup_steps=-5"], "model.optim.sched.warmup_steps must be >= 0, got -5"),
    (1, ["model.optim.sched.min_lr=1.0"], "model.optim.sched.min_lr 1.0 is above model.optim.lr 0.002"),
    (1, ["model.optim.sched.name=linear"], "model.optim.sched.name must be cosine"),
    (1, ["model.optim.grad_clip=-1"], "model.optim.grad_clip must be >= 0, got -1.0"),
    (1, ["model.optim.eps=0"], "model.optim.eps must be > 0, got 0.0"),
    (1, ["exp_manager.checkpoint.every_n_steps=-1"], "exp_manager.checkpoint.every_n_steps must be >= 0, got -1"),
    (1, ["exp_manager.checkpoint.save_top_k=0"], "exp_manager.checkpoint.save_top_k must be >= 1, got 0"),
    (1, ["model.data.num_workers=-1"], "model.data.num_workers must be >= 0, got -1"),
    (1, ["model.data.eval_batch_size=0"], "model.data.eval_batch_size must be >= 1, got 0"),
    (1, ["model.data.shuffle_buffer=-1"], "model.data.shuffle_buffer must be >= 0, got -1"),
    (1, ["model.data.prefetch_factor=0"], "model.data.prefetch_factor must be >= 1, got 0"),
    (1, ["model.text.num_attention_heads=0"], "model.text.num_attention_heads must be >= 1, got 0"),
    (1, ["model.vision.patch_dim=0"], "model.vision.patch_dim must be >= 1, got 0"),
    (1, ["model.vision.attention_dropout=1.0"], "model.vision.attention_dropout must be in [0, 1), got 1.0"),
    (1, ["model.text.layernorm_epsilon=0"], "model.text.layernorm_epsilon must be > 0, got 0.0"),
    (1, ["seed=-1"], "model.seed must be in [0, 2**32), got -1"),
    (1, ["trainer.device=tpu"], "trainer.device must be auto, cpu or cuda, got 'tpu'"),
    (1, ["model.vision.image_mean=[0.5,0.5]"], "model.vision.image_mean needs 3 values (R, G, B), got [0.5, 0.5]"),
    (1, ["model.vision.image_std=[0.5,0.0,0.5]"], "model.vision.image_std values must be > 0"),
    # read at the first evaluation, possibly hours in
    (1, ["model.data.zeroshot.synthetic=size"], "model.data.zeroshot.synthetic must be colour, shape or null, got 'size'"),
    (1, ["model.data.zeroshot.folder=/nonexistent"], "model.data.zeroshot.folder: no such directory /nonexistent"),
    (1, ["model.data.zeroshot.shards=/nonexistent/{0..1}.tar"], "model.data.zeroshot.shards: shard file(s) missing, e.g. /nonexistent/0.tar"),
    (1, ["model.data.zeroshot.folder=/", "model.data.zeroshot.templates=/nonexistent.txt", "model.data.zeroshot.classes=/nonexistent.txt"],
     "model.data.zeroshot.classes: cannot read /nonexistent.txt (No such file or directory)"),
    (1, ["model.data.zeroshot.folder=/"], "model.data.zeroshot.classes is not set"),
    (2, ["model.data.synthetic_train_samples=64"], "model.data.synthetic_train_samples 64 make too few train shards of "
                                                   "1024 for 2 data-parallel ranks x 1 loader workers: need at least 1025"),
    (1, ["trainer.collective_timeout_s=0"], "trainer.collective_timeout_s must be > 0 seconds, got 0.0"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_cuda_device_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="trainer.device=cuda but torch sees no GPU here"):
        config_from_argv(["trainer.device=cuda"])


def test_unwritable_experiment_directory_is_a_config_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=f"exp_manager.exp_dir {tmp_path}/a_file/run: {tmp_path}/a_file is a file, not a directory"):
        config_from_argv([f"exp_manager.exp_dir={tmp_path}/a_file/run"])
    # Nobody, root included, creates files in /proc; permission bits would not show that (root passes
    # them), which is why the check writes a file.
    with pytest.raises(ConfigError, match="exp_manager.exp_dir /proc/megaclip/run is not writable: cannot create a file in /proc"):
        config_from_argv(["exp_manager.exp_dir=/proc/megaclip/run"])


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only mount where root may mount one (root writes through permission bits), else a
    mode-555 directory."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)], capture_output=True).returncode == 0:
        yield directory
        subprocess.run(["umount", str(directory)], check=True)
        return
    directory.chmod(0o555)
    if os.access(directory, os.W_OK):
        pytest.skip("root without the right to mount writes into any directory")
    yield directory


def test_read_only_experiment_directory_is_a_config_error(read_only_dir):
    with pytest.raises(ConfigError, match=f"is not writable: cannot create a file in {read_only_dir} "
                                          r"\((Read-only file system|Permission denied)\)"):
        config_from_argv([f"exp_manager.exp_dir={read_only_dir}/run"])


def test_synthetic_directory_with_stray_files_is_a_config_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a data set")
    with pytest.raises(ConfigError, match=f"model.data.synthetic_dir {tmp_path} holds files but no complete synthetic set"):
        config_from_argv([f"model.data.synthetic_dir={tmp_path}"])


def test_empty_synthetic_directory_is_generated(tmp_path):
    cfg = config_from_argv([f"model.data.synthetic_dir={tmp_path}", "model.data.synthetic_train_samples=16"])
    prepare.ensure_synthetic(cfg.model)
    assert (tmp_path / "tokenizer.model").is_file() and list(tmp_path.glob("train-*.tar")) and list(tmp_path.glob("val-*.tar"))


def fake_checkpoint(directory, *overrides):
    """A step directory's metadata only: what the start-up check reads."""
    directory.mkdir(parents=True)
    write_meta(directory, load_config("clip_tiny", list(overrides)), {"step": 5})
    (directory.parent / "latest").write_text(directory.name + "\n")
    return directory


def test_missing_init_from_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=f"model.init_from: no such checkpoint {tmp_path}/converted"):
        config_from_argv([f"model.init_from={tmp_path}/converted"])


def test_init_from_another_architecture_fails_before_start_up(tmp_path):
    converted = fake_checkpoint(tmp_path / "converted" / "step_0000005", "model.vision.num_layers=3")
    expected = (f"model.init_from {converted.parent}: checkpoint architecture differs from the config: "
                "model.vision.num_layers is 3 in the checkpoint, 4 in the config")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        config_from_argv([f"model.init_from={converted.parent}", f"exp_manager.exp_dir={tmp_path}/run"])
    config_from_argv([f"model.init_from={converted.parent}", "model.vision.num_layers=3", f"exp_manager.exp_dir={tmp_path}/run"])


def test_resuming_another_architecture_fails_before_start_up(tmp_path):
    fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000005", "model.output_dim=32")
    args = [f"exp_manager.exp_dir={tmp_path}/run", "model.init_from=/gone"]  # a resumed run reads no init_from
    with pytest.raises(ConfigError, match="resuming from .*/step_0000005: checkpoint architecture differs from the "
                                          "config: model.output_dim is 32 in the checkpoint, 64 in the config"):
        config_from_argv(args)
    with pytest.raises(ConfigError, match="model.init_from: no such checkpoint /gone"):
        config_from_argv(args + ["exp_manager.resume_if_exists=false"])


def test_zero_shot_templates_are_read_before_the_run(tmp_path):
    (tmp_path / "classes.txt").write_text("red\nblue\n")
    (tmp_path / "templates.txt").write_text("a photo of a thing.\n")
    with pytest.raises(ConfigError, match=r"model.data.zeroshot.templates: .*templates.txt: every template needs exactly one \{\}"):
        config_from_argv([f"model.data.zeroshot.folder={tmp_path}", f"model.data.zeroshot.classes={tmp_path}/classes.txt",
                          f"model.data.zeroshot.templates={tmp_path}/templates.txt"])

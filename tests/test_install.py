"""Installed as users install: a wheel built from this checkout, installed apart from the sources, runs
the main job from any working directory with its packaged configs."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED_CONFIGS = ["clip_tiny", "clip_B32", "clip_B16", "clip_L14", "clip_H14", "clip_g14", "clip_G14", "clip_e14"]


def run(*command, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=300, **kw)


def test_a_wheel_installed_apart_from_the_sources_runs_the_main_job(tmp_path):
    # built from a copy: a build in the checkout would leave build/ and egg-info behind in it
    project = tmp_path / "project"
    shutil.copytree(ROOT / "megaclip", project / "megaclip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project)
    pip = [sys.executable, "-m", "pip", "-q"]
    built = run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", project)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("megaclip-*.whl")
    site = tmp_path / "site"
    installed = run(*pip, "install", "--no-deps", "--target", site, wheel)
    assert installed.returncode == 0, installed.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"  # no checkout here or above: the package comes from `site` only
    elsewhere.mkdir()
    env = os.environ | {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    found = run(sys.executable, "-c", f"import megaclip, megaclip.config as c; [c.load_config(n) for n in {SEED_CONFIGS}]; "
                "print(megaclip.__file__)", cwd=elsewhere, env=env)
    assert found.returncode == 0 and found.stdout.strip() == str(site / "megaclip" / "__init__.py"), found.stderr[-2000:]

    # as README runs it, on one process (tensor parallelism is tested elsewhere)
    main_job = run(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "megaclip.pretrain",
                   "steps=4", "trainer.log_every_n_steps=2", "model.data.synthetic_train_samples=256", cwd=elsewhere, env=env)
    assert main_job.returncode == 0, main_job.stderr[-3000:]
    assert re.fullmatch(r"final: step=4 loss=[\d.]+ i2t_R@1=[\d.]+ t2i_R@1=[\d.]+ chance_R@1=0.0023",
                        main_job.stdout.strip().splitlines()[-1]), main_job.stdout[-2000:]
    # the configs' relative paths: generated data and the run go to the working directory
    assert (elsewhere / "data" / "synthetic" / "tokenizer.model").is_file()
    assert (elsewhere / "runs" / "clip_tiny" / "checkpoints" / "latest").read_text() == "step_0000004\n"

    # the console script: a bad config ends in one line before torch is imported
    script = run(site / "bin" / "megaclip-pretrain", "tp=3", cwd=elsewhere, env=env)
    assert script.returncode == 2 and script.stderr == ("megaclip: error: world size 1 is not divisible by "
                                                        "tensor_model_parallel_size 3\n"), script.stderr

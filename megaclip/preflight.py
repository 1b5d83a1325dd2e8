"""Checks of the files a run will read and write, made before any process group starts (one
``ConfigError`` line each): data shards and the synthetic set, zero-shot files, the experiment
directory, the checkpoint the run starts from. ``megaclip.config_checks.validate`` judges the settings.
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Any

from megaclip.config import ConfigError


def validate_run(cfg: Any) -> None:
    """ConfigError (one line) for the files a training run would fail on after its start-up: an
    experiment directory it cannot write, a synthetic data directory that is neither absent, empty nor
    complete, and a checkpoint to start from (the run's own latest, else model.init_from) that is
    missing or does not fit the model. Reads only small files (config.yaml, meta.json)."""
    _validate_writable(cfg.exp_manager.exp_dir)
    _validate_synthetic_dir(cfg.model)
    _validate_start_checkpoint(cfg)


def _validate_writable(exp_dir: str) -> None:
    """Create (and remove) a file where the run will write first: the experiment directory, or the
    nearest of its parents that exists. Permission bits alone would not do: root passes them, yet
    cannot write in /proc or on a read-only mount."""
    import tempfile

    existing = Path(exp_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"exp_manager.exp_dir {exp_dir}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"exp_manager.exp_dir {exp_dir} is not writable: cannot create a file in {existing} "
                          f"({e.strerror})") from None


def _validate_synthetic_dir(m: Any) -> None:
    from megaclip.data.prepare import synthetic_status, uses_synthetic

    if uses_synthetic(m) and synthetic_status(m.data.synthetic_dir) == "incomplete":
        raise ConfigError(f"model.data.synthetic_dir {m.data.synthetic_dir} holds files but no complete synthetic set "
                          "(train/val shards and tokenizer.model); remove it to have it generated again, or name another directory")


def _validate_start_checkpoint(cfg: Any) -> None:
    """The checkpoint the run will load, checked against the model config in seconds instead of after
    the start-up. A run that resumes does not read model.init_from (which may be gone by then)."""
    from megaclip.checkpoint import CheckpointError
    from megaclip.checkpoint.files import latest, read_meta, resolve
    from megaclip.checkpoint.model import check_architecture

    own = latest(Path(cfg.exp_manager.exp_dir) / "checkpoints") if cfg.exp_manager.resume_if_exists else None
    start, key = (own, "resuming from") if own else (cfg.model.init_from, "model.init_from")
    if start is None:
        return
    if not Path(start).exists():
        raise ConfigError(f"{key}: no such checkpoint {start}")
    try:
        _, saved = read_meta(resolve(start))
        check_architecture(saved.model, cfg.model)
    except CheckpointError as e:
        raise ConfigError(f"{key} {start}: {e}") from None


def validate_data(m: Any, dp: int) -> None:
    from megaclip.data.loader import check_sources
    from megaclip.data.shards import expand_shards, missing_shards, parse_sources

    d = m.data
    for key in ("train_shards", "val_shards"):
        pattern = d[key]
        if pattern is None:
            if d.synthetic_dir is None:
                raise ConfigError(f"model.data.{key} is not set and model.data.synthetic_dir is null")
            continue
        missing = missing_shards(pattern)
        if missing:
            raise ConfigError(f"model.data.{key}: {len(missing)} shard file(s) missing, e.g. {missing[0]}")
        if not expand_shards(pattern):
            raise ConfigError(f"model.data.{key}: no shard files found for '{pattern}'")
    tok = m.text.tokenizer
    if tok.library not in ("sentencepiece", "clip_bpe"):
        raise ConfigError(f"model.text.tokenizer.library must be sentencepiece or clip_bpe, got '{tok.library}'")
    if tok.library == "sentencepiece" and tok.model is None and d.synthetic_dir is None:
        raise ConfigError("model.text.tokenizer.model is not set (a sentencepiece model file; tools/train_tokenizer.py makes one)")
    if tok.model is not None and not Path(tok.model).is_file():
        raise ConfigError(f"model.text.tokenizer.model: no such file {tok.model}")
    if d.train_shards is not None:
        try:
            check_sources(parse_sources(d.train_shards), d, dp)
        except ValueError as e:
            raise ConfigError(f"model.data.train_shards: {e}") from None
    elif not d.resampled:
        _validate_synthetic_shard_count(d, dp)
    v = m.vision
    for key in ("image_mean", "image_std"):
        if v[key] is not None and len(v[key]) != 3:
            raise ConfigError(f"model.vision.{key} needs 3 values (R, G, B), got {list(v[key])}")
    if v.image_std is not None and min(v.image_std) <= 0:
        raise ConfigError(f"model.vision.image_std values must be > 0, got {list(v.image_std)}")
    _validate_zeroshot(d.zeroshot)


def _validate_zeroshot(z: Any) -> None:
    """Zero-shot settings are read at the first evaluation, maybe hours in: read their files now."""
    from megaclip import zeroshot
    from megaclip.data.shards import missing_shards

    if z.synthetic not in (None, "colour", "shape"):
        raise ConfigError(f"model.data.zeroshot.synthetic must be colour, shape or null, got '{z.synthetic}'")
    if not (z.folder or z.shards):
        return
    if z.folder and not Path(z.folder).is_dir():
        raise ConfigError(f"model.data.zeroshot.folder: no such directory {z.folder}")
    if not z.folder and missing_shards(z.shards):
        raise ConfigError(f"model.data.zeroshot.shards: shard file(s) missing, e.g. {missing_shards(z.shards)[0]}")
    if z.classes is None:
        raise ConfigError("model.data.zeroshot.classes is not set (a class names file, one per line, in label order)")
    for key, read in (("classes", zeroshot.read_class_names), ("templates", zeroshot.read_templates)):
        if z[key] is not None:
            try:
                read(z[key])
            except OSError as e:
                raise ConfigError(f"model.data.zeroshot.{key}: cannot read {z[key]} ({e.strerror})") from None
            except ValueError as e:
                raise ConfigError(f"model.data.zeroshot.{key}: {e}") from None


def _validate_synthetic_shard_count(d: Any, dp: int) -> None:
    """The synthetic train split, like any other, needs a shard for every DP rank's every loader worker."""
    from megaclip.data import prepare, synthetic

    readers = max(1, d.num_workers)
    if prepare.synthetic_status(d.synthetic_dir) == "complete":
        shards = len(glob.glob(os.path.join(glob.escape(d.synthetic_dir), "train-*.tar")))
        if shards < dp * readers:
            raise ConfigError(f"model.data.synthetic_dir {d.synthetic_dir} holds {shards} train shard(s), too few for "
                              f"{dp} data-parallel ranks x {readers} loader workers (or set model.data.resampled=true)")
    elif math.ceil(d.synthetic_train_samples / synthetic.SAMPLES_PER_SHARD) < dp * readers:
        raise ConfigError(f"model.data.synthetic_train_samples {d.synthetic_train_samples} make too few train shards of "
                          f"{synthetic.SAMPLES_PER_SHARD} for {dp} data-parallel ranks x {readers} loader workers: "
                          f"need at least {(dp * readers - 1) * synthetic.SAMPLES_PER_SHARD + 1} (or model.data.resampled=true)")

"""Where a run's shards and tokenizer come from: the configured paths, or the synthetic set, which is
generated on first use (by one rank while the others wait)."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megaclip import distributed
from megaclip.data import synthetic

GENERATION_LIMIT_S = 3600  # how long the other ranks wait for rank 0 to generate the synthetic set


@dataclass
class DataSources:
    train_shards: Optional[str]
    val_shards: Optional[str]
    tokenizer_model: Optional[str]


def resolve(model_cfg) -> DataSources:
    """The configured sources; a split neither configured nor synthetic (a converted model's) is None."""
    d, synthetic_dir = model_cfg.data, model_cfg.data.synthetic_dir
    return DataSources(
        train_shards=d.train_shards or (synthetic.train_shards_pattern(synthetic_dir) if synthetic_dir else None),
        val_shards=d.val_shards or (synthetic.val_shards_pattern(synthetic_dir) if synthetic_dir else None),
        tokenizer_model=model_cfg.text.tokenizer.model or (synthetic.tokenizer_path(synthetic_dir) if synthetic_dir else None),
    )


def uses_synthetic(model_cfg) -> bool:
    """Whether the config reads anything from the synthetic set: shards or its tokenizer."""
    d, tok = model_cfg.data, model_cfg.text.tokenizer
    synthetic_tokenizer = tok.library == "sentencepiece" and tok.model is None
    return d.synthetic_dir is not None and (d.train_shards is None or d.val_shards is None or synthetic_tokenizer)


def synthetic_status(directory: str) -> str:
    """absent | empty (both generated on first use) | complete | incomplete (files, but not the set:
    never written over). The set is renamed into place whole, so shards and tokenizer mean complete."""
    if not os.path.isdir(directory):
        return "absent"
    if not os.listdir(directory):
        return "empty"
    splits = [glob.glob(os.path.join(glob.escape(directory), f"{split}-*.tar")) for split in ("train", "val")]
    return "complete" if all(splits) and os.path.isfile(synthetic.tokenizer_path(directory)) else "incomplete"


def synthetic_kind_problem(model_cfg) -> Optional[str]:
    """A line saying that the complete synthetic set the config reads is of another kind, else None."""
    d = model_cfg.data
    if not (uses_synthetic(model_cfg) and synthetic_status(d.synthetic_dir) == "complete"):
        return None
    found = synthetic.objects_in(d.synthetic_dir)
    if found == d.synthetic_objects:
        return None
    return (f"model.data.synthetic_dir {d.synthetic_dir} holds the {found}-object synthetic set, not the "
            f"model.data.synthetic_objects={d.synthetic_objects} kind: name another directory (or remove it to have it generated again)")


def ensure_synthetic(model_cfg) -> None:
    """Generate the synthetic set if the config uses it and it is absent (or an empty directory); all
    ranks return once it exists."""
    d = model_cfg.data
    missing = uses_synthetic(model_cfg) and synthetic_status(d.synthetic_dir) in ("absent", "empty")
    if missing and int(os.environ.get("RANK", "0")) == 0:
        print(f"generating synthetic shards in {d.synthetic_dir} ...", flush=True)
        # Rendered at 64 px at least so that downscaling to the model's size anti-aliases the shapes.
        synthetic.write_synthetic_shards(d.synthetic_dir, image_size=max(64, model_cfg.vision.img_h),
                                         train_samples=d.synthetic_train_samples, seed=0, objects=d.synthetic_objects)
    if dist.is_initialized():  # generating (~15 s for 16k pairs on one core) may outlast a short collective timeout
        distributed.barrier_allowing(GENERATION_LIMIT_S)

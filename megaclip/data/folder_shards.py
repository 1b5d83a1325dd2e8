"""A folder of images and a captions table (CSV, or parquet when pyarrow is installed) -> train/val
webdataset shards the loaders read: `<key>.<jpg|png|webp>` (the file's bytes as they are), `<key>.txt`
(the caption) and `<key>.json` ({"file", "caption"}). Images are not decoded here; the loader skips
and counts undecodable ones.
"""
from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import webdataset as wds

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class FolderShards:
    train_shards: Optional[str]  # brace pattern, None when the split is empty
    val_shards: Optional[str]
    train_samples: int
    val_samples: int
    skipped: Dict[str, int] = field(default_factory=dict)  # rows left out, by reason


def read_caption_table(path: str, file_column: str, caption_column: str) -> List[Tuple[str, str]]:
    """(file name, caption) rows of a .csv (with a header) or .parquet table."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading a parquet captions table needs pyarrow (pip install pyarrow), or use a CSV") from None
        table = pq.read_table(path, columns=[file_column, caption_column]).to_pydict()
        return list(zip(table[file_column], table[caption_column]))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (file_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing}; its columns are {reader.fieldnames}")
        return [(row[file_column], row[caption_column]) for row in reader]


def _usable_rows(images_dir: str, rows, skipped: Counter) -> List[Tuple[str, str, str]]:
    usable = []
    for file, caption in rows:
        extension = EXTENSIONS.get(os.path.splitext(str(file))[1].lower())
        caption = (caption or "").strip()
        if extension is None:
            skipped["unsupported_extension"] += 1
        elif not caption:
            skipped["empty_caption"] += 1
        elif not os.path.isfile(os.path.join(images_dir, file)):
            skipped["missing_file"] += 1
        else:
            usable.append((file, caption, extension))
    return usable


def _write_split(images_dir: str, out_dir: str, split: str, rows, samples_per_shard: int) -> Optional[str]:
    if not rows:
        return None
    pattern = os.path.join(out_dir, f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as sink:
        for index, (file, caption, extension) in enumerate(rows):
            with open(os.path.join(images_dir, file), "rb") as f:
                image = f.read()
            sink.write({"__key__": f"{index:09d}", extension: image, "txt": caption,
                        "json": json.dumps({"file": file, "caption": caption})})
    last = (len(rows) - 1) // samples_per_shard
    return os.path.join(out_dir, f"{split}-{{000000..{last:06d}}}.tar")


def write_folder_shards(images_dir: str, captions_table: str, out_dir: str, *, file_column: str = "file",
                        caption_column: str = "caption", val_fraction: float = 0.0,
                        samples_per_shard: int = 1000, seed: int = 0) -> FolderShards:
    """Shuffle the usable rows (seeded), hold out val_fraction of them as val, write both splits."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if os.path.isdir(out_dir) and any(name.endswith(".tar") for name in os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already holds shards")
    skipped = Counter()
    rows = _usable_rows(images_dir, read_caption_table(captions_table, file_column, caption_column), skipped)
    # shards are read in order within a window, so neighbouring rows should be unrelated
    random.Random(seed).shuffle(rows)
    held_out = round(len(rows) * val_fraction)
    os.makedirs(out_dir, exist_ok=True)
    return FolderShards(
        train_shards=_write_split(images_dir, out_dir, "train", rows[held_out:], samples_per_shard),
        val_shards=_write_split(images_dir, out_dir, "val", rows[:held_out], samples_per_shard),
        train_samples=len(rows) - held_out, val_samples=held_out, skipped=dict(skipped))

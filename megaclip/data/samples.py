"""Raw webdataset samples -> (image, captions, label), with every piece of bad input skipped and counted.

Web-scale shards always hold some junk: undecodable images, empty captions, truncated or unreadable
tars. None of it stops a run; each is counted under one of SKIP_KINDS so the trainer can report it.
"""
from __future__ import annotations

import io
import json
import sys
from typing import Iterable, Iterator, Optional, Sequence

import webdataset as wds
from PIL import Image

from megaclip.data.shards import expand_shards
from megaclip.data.tar_files import tar_files

# a bad shard is counted once, whatever number of samples it lost
SKIP_KINDS = ("bad_shards", "bad_images", "missing_images", "missing_captions", "missing_labels")
BAD_SHARD = "__bad_shard__"  # the key of the marker sample read_shards yields for a bad shard
_reported_shards = set()  # bad shards this process has warned about: a shard is read again every epoch


class DataError(RuntimeError):
    """Input the run cannot go on with (not bad samples, which are skipped); the message is one line."""


class Skipped(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def read_shards(urls: Iterable[str]) -> Iterator[dict]:
    """The undecoded samples of each shard in turn, and a {BAD_SHARD: url} marker in place of the
    rest of a shard that is unreadable, truncated or empty (the sample being read when it ended is
    lost with it: its members may be cut off).

    The marker travels with the samples (through the shuffle buffer, past a resume's skip), so a bad
    shard is counted where its samples would have been, exactly once however often it is re-read.
    """
    for url in urls:
        count = 0
        try:
            for sample in wds.tariterators.group_by_keys(tar_files(url)):
                count += 1
                yield sample
        except Exception as e:  # tarfile, gzip and OS errors all mean: this shard ends here
            reason = " ".join(str(e).split()) or type(e).__name__
            skipping = f"the rest of shard {url} after {count} samples" if count else f"shard {url}"
            _report_bad_shard(url, f"skipping {skipping}: {reason}")
            yield {BAD_SHARD: url}
            continue
        if count == 0:
            _report_bad_shard(url, f"shard {url} holds no samples")
            yield {BAD_SHARD: url}


def _report_bad_shard(url: str, message: str) -> None:
    """One line per bad shard and process, on stderr (from a loader worker too)."""
    if url not in _reported_shards:
        _reported_shards.add(url)
        print(f"megaclip: warning: {message} (counted in bad_shards)", file=sys.stderr, flush=True)


class SampleDecoder:
    """Decodes only the members a sample is used for.

    image_keys: member extensions tried in order (jpg, png, webp, ...).
    caption_key: "txt" (one caption per non-empty line), "json:FIELD" (a string or a list of strings),
        or None to read no captions.
    label_key: member holding an integer class label (e.g. "cls"), or None.
    """

    def __init__(self, image_keys: Sequence[str], caption_key: Optional[str], label_key: Optional[str] = None):
        self.image_keys = [key.lower() for key in image_keys]
        self.caption_key = caption_key
        self.caption_member, _, self.caption_field = (caption_key or "").partition(":")
        self.label_key = label_key

    def image(self, sample: dict) -> Image.Image:
        key = next((k for k in self.image_keys if k in sample), None)
        if key is None:
            raise Skipped("missing_images")
        try:
            return Image.open(io.BytesIO(sample[key])).convert("RGB")
        except Exception:  # PIL raises anything from OSError to SyntaxError on junk bytes
            raise Skipped("bad_images") from None

    def captions(self, sample: dict) -> list[str]:
        if self.caption_key is None:
            return []
        try:
            text = sample[self.caption_member].decode("utf-8")
            value = json.loads(text)[self.caption_field] if self.caption_field else text.splitlines()
            captions = [value] if isinstance(value, str) else list(value)
        except (KeyError, TypeError, ValueError):  # absent member or field, not UTF-8, not JSON
            raise Skipped("missing_captions") from None
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            raise Skipped("missing_captions")
        return captions

    def label(self, sample: dict) -> Optional[int]:
        if self.label_key is None:
            return None
        try:
            return int(sample[self.label_key].decode("utf-8").strip())
        except (KeyError, ValueError):
            raise Skipped("missing_labels") from None

    def __call__(self, sample: dict) -> tuple[list[str], Optional[int], Image.Image]:
        """(captions, label, image); raises Skipped with the kind to count for bad input."""
        if BAD_SHARD in sample:
            raise Skipped("bad_shards")
        # the cheap members first, so a caption-less sample costs no image decode
        return self.captions(sample), self.label(sample), self.image(sample)


def shard_captions(shards, caption_key: str = "txt") -> Iterator[str]:
    """Every caption of the shards (a brace pattern, directory or list) in turn, no image decoded;
    samples without one are skipped."""
    decoder = SampleDecoder(image_keys=[], caption_key=caption_key)
    for sample in read_shards(expand_shards(shards)):
        try:
            yield from decoder.captions(sample)
        except Skipped:
            continue

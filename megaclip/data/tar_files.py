"""The files of a tar shard in order, and an error for a shard cut short wherever the cut falls.

webdataset's tar reader hands the stream to tarfile, which ends its iteration silently where a header
is missing or cut off: a shard truncated at or just after a member boundary reads as whole, its last
sample short of the members that were cut away (an image without its caption, say). A whole tar ends
with an all-zero end-of-archive block; here a shard counts as whole only when that block is read.
"""
from __future__ import annotations

import re
import tarfile
from typing import Iterator

import webdataset as wds

_WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # files webdataset's own reader leaves out


class TruncatedShard(EOFError):
    pass


class _Header(tarfile.TarInfo):
    """A tar header that notes on its archive when it is the end-of-archive block."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a whole all-zero block: tarfile ends the iteration here
            tar.reached_end_block = True
            raise


def tar_files(url: str) -> Iterator[dict]:
    """{fname, data, __url__} of each regular file of the shard at ``url`` (any URL webdataset opens),
    the records webdataset's ``group_by_keys`` makes samples of. Raises TruncatedShard after the last
    file of a shard without its end-of-archive block, and tarfile's errors for one cut inside a member
    or otherwise unreadable."""
    with wds.gopen(url) as stream:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Header)
        for member in tar:
            if member.isreg() and not _WEBDATASET_META.match(member.name):
                yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
            tar.members = []  # a stream is read once: keep no index of every member
        if not getattr(tar, "reached_end_block", False):
            raise TruncatedShard("truncated, no end-of-archive block")

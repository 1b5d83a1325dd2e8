"""Which shards a loader reads: shard specs, weighted sources, and each reader's shards per epoch.

A reader is one loader worker of one data-parallel rank. Its shards are a pure function of
(seed, epoch, dp_rank, worker), so tensor-parallel peers and a resumed run plan the same shards.
"""
from __future__ import annotations

import glob
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass

import braceexpand


@dataclass(frozen=True)
class Source:
    shards: tuple[str, ...]
    weight: float = 1.0


def _is_local(url: str) -> bool:
    # pipe:/http:/s3: shards are opened by webdataset's gopen and cannot be checked up front
    return not (url.startswith("pipe:") or "://" in url)


def _source_specs(spec) -> list[tuple[object, float]]:
    """(shard spec, weight) pairs: a list holding {shards, weight} mappings names several sources,
    anything else (a pattern, a directory, a list of them) one source."""
    if isinstance(spec, Mapping):
        return [(spec["shards"], float(spec.get("weight", 1.0)))]
    if not isinstance(spec, (str, os.PathLike)) and any(isinstance(item, Mapping) for item in spec):
        return [pair for item in spec for pair in _source_specs(item)]
    return [(spec, 1.0)]


def _named_shards(spec) -> list[str]:
    """Paths named by a brace pattern, a directory (all its .tar files) or a list of either."""
    if isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            return sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        return list(braceexpand.braceexpand(spec))
    return [path for item in spec for path in _named_shards(item)]


def expand_shards(spec) -> list[str]:
    """The shards named by spec (see parse_sources) that exist or are remote, in order."""
    return [url for shards, _ in _source_specs(spec) for url in _named_shards(shards)
            if not _is_local(url) or os.path.isfile(url)]


def missing_shards(spec) -> list[str]:
    """The local shard files named by spec that do not exist."""
    return [url for shards, _ in _source_specs(spec) for url in _named_shards(shards)
            if _is_local(url) and not os.path.isfile(url)]


def parse_sources(spec) -> list[Source]:
    """Sources from a brace pattern, a directory, a list of them, or a list of {shards, weight}
    entries; FileNotFoundError when a named local shard is missing or a source names none."""
    missing = missing_shards(spec)
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    sources = []
    for shards, weight in _source_specs(spec):
        if weight <= 0:
            raise ValueError(f"source {shards!r} has weight {weight}; weights must be positive")
        urls = expand_shards(shards)
        if not urls:
            raise FileNotFoundError(f"no shards found for {shards!r}")
        sources.append(Source(tuple(urls), weight))
    return sources


def epoch_shards(sources: list[Source], *, seed: int, epoch: int, dp_rank: int, dp_size: int,
                 worker: int, workers: int) -> list[str]:
    """Every shard once per epoch: one shuffle shared by all ranks, split by DP rank, then by worker."""
    shards = [url for source in sources for url in source.shards]
    random.Random(f"{seed}/shards/epoch{epoch}").shuffle(shards)
    return shards[dp_rank::dp_size][worker::workers]


def resampled_shards(sources: list[Source], *, seed: int, epoch: int, dp_rank: int, worker: int,
                     count: int) -> list[str]:
    """count shards drawn with replacement: a source by weight, then one of its shards uniformly."""
    rng = random.Random(f"{seed}/resampled/dp{dp_rank}/worker{worker}/epoch{epoch}")
    picks = rng.choices(sources, weights=[source.weight for source in sources], k=count)
    return [rng.choice(source.shards) for source in picks]

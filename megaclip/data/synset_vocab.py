"""CatLIP's class vocabulary: the synsets counted over the training captions, most frequent first.

Written by tools/build_synset_vocab.py as a TSV file (header ``synset<TAB>name<TAB>count``, then one
synset a line: "n02084071<TAB>dog.n.01<TAB>5120"); a synset's class index is its line number.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from functools import lru_cache
from typing import Iterable, Optional, Sequence

import torch

from megaclip.data.samples import DataError, shard_captions
from megaclip.data.synsets import Synset, lexicon
from megaclip.data.synthetic import COLOURS, POSITIONS, SHAPES, caption

HEADER = ("synset", "name", "count")


def count_synsets(captions: Iterable[str]) -> tuple[Counter, int]:
    """How many captions name each synset (once per caption), and how many captions there were."""
    nouns = lexicon()
    counts = Counter()
    total = 0
    for caption in captions:
        counts.update(nouns.caption_synsets(caption))
        total += 1
    return counts, total


def run_vocabulary(model_cfg, train_shards) -> SynsetVocabulary:
    """model.catlip.vocabulary, or, for the synthetic set (config.py refuses other data without one),
    the synsets of its train captions: every rank counts the same captions, so all hold one vocabulary
    with no file written. The classes are split over TP, so their number must divide by it."""
    path = model_cfg.catlip.vocabulary
    vocabulary = (SynsetVocabulary.load(path) if path is not None else
                  SynsetVocabulary.from_counts(count_synsets(shard_captions(train_shards, model_cfg.data.caption_key))[0]))
    tp = model_cfg.tensor_model_parallel_size
    if len(vocabulary) % tp:
        raise DataError(f"the CatLIP vocabulary has {len(vocabulary)} classes, not divisible by "
                        f"tensor_model_parallel_size {tp} (build_synset_vocab.py --max-size picks the count)")
    return vocabulary


def planned_class_count(model_cfg) -> int:
    """The class count a CatLIP run of this config will have, without reading its shards (for the
    memory planner): its vocabulary file's, or the synthetic set's, every synset its caption grammar
    names (its train split, random captions of that grammar, names them all at any useful size)."""
    path = model_cfg.catlip.vocabulary
    return _file_class_count(path, os.stat(path).st_mtime_ns) if path is not None else len(_synthetic_synsets())


@lru_cache(maxsize=8)
def _file_class_count(path: str, modified: int) -> int:
    """Cached: the planner asks for every layout it tries; ``modified`` keys a rewritten file afresh."""
    return len(SynsetVocabulary.load(path))


@lru_cache(maxsize=1)
def _synthetic_synsets() -> Counter:
    return count_synsets(caption(c, s, p) for c in COLOURS for s in SHAPES for p in range(len(POSITIONS)))[0]


class SynsetVocabulary:
    def __init__(self, entries: Sequence[tuple[Synset, int]]):
        self.synsets = [synset for synset, _ in entries]
        self.counts = [count for _, count in entries]
        self.index = {synset.id: i for i, synset in enumerate(self.synsets)}
        if len(self.index) != len(self.synsets):
            raise DataError("a synset vocabulary lists a synset twice")

    @classmethod
    def from_counts(cls, counts: Counter, *, min_count: int = 1, max_size: Optional[int] = None) -> SynsetVocabulary:
        """The synsets named by at least min_count captions, the max_size most frequent of them (ties in
        id order, so the same counts always give the same classes)."""
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0].id))
        kept = [(synset, count) for synset, count in ranked if count >= min_count]
        return cls(kept[:max_size])

    @classmethod
    def load(cls, path: str) -> SynsetVocabulary:
        entries = []
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the synset vocabulary {path}: {e}") from None
        if not lines or tuple(lines[0].split("\t")) != HEADER:
            raise DataError(f"{path} is not a synset vocabulary: its first line must be '{chr(9).join(HEADER)}'")
        for number, line in enumerate(lines[1:], start=2):
            fields = line.split("\t")
            if len(fields) != 3 or not fields[0].startswith("n") or not fields[2].isdigit():
                raise DataError(f"{path} line {number}: expected 'n<offset><TAB>name<TAB>count', got {line!r}")
            entries.append((Synset(fields[0], fields[1]), int(fields[2])))
        if not entries:
            raise DataError(f"the synset vocabulary {path} holds no synsets")
        return cls(entries)

    def save(self, path: str) -> None:
        """Write atomically: a failed write leaves whatever was at path untouched."""
        rows = ["\t".join(HEADER)] + [f"{s.id}\t{s.name}\t{c}" for s, c in zip(self.synsets, self.counts)]
        partial = f"{path}.partial"
        try:
            with open(partial, "w", encoding="utf-8") as f:
                f.write("\n".join(rows) + "\n")
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise

    def __len__(self) -> int:
        return len(self.synsets)

    def classes(self, caption: str) -> list[int]:
        """Class indices of the caption's synsets that are in the vocabulary."""
        return [self.index[s.id] for s in lexicon().caption_synsets(caption) if s.id in self.index]

    def multi_hot(self, captions: Sequence[str]) -> torch.Tensor:
        """CatLIP's targets: a (len(captions), len(self)) float tensor, 1 where a caption names the class."""
        targets = torch.zeros(len(captions), len(self))
        for row, caption in enumerate(captions):
            targets[row, self.classes(caption)] = 1.0
        return targets

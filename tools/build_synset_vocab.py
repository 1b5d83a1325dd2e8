"""Build CatLIP's synset vocabulary from the captions of webdataset shards.

    python tools/build_synset_vocab.py --shards "data/laion/{00000..00999}.tar" --min-count 500 \\
        --max-size 25000 --out data/laion/synsets.tsv

Each caption is mapped to WordNet noun synsets (megaclip.data.synsets); a synset is counted once per
caption. The vocabulary keeps the synsets named by at least --min-count captions, at most --max-size of
them, most frequent first, and is written as a TSV (synset, name, count). Only caption members are read;
--workers processes count shards in parallel (the result does not depend on their number).
A failure ends with one line, ``build_synset_vocab: error: ...``, exit code 2, and leaves --out as it was.
"""

import argparse
import contextlib
import multiprocessing
import sys
import time
from collections import Counter
from functools import partial

from megaclip.data.samples import shard_captions
from megaclip.data.shards import expand_shards, missing_shards
from megaclip.data.synset_vocab import SynsetVocabulary, count_synsets
from megaclip.data.synsets import lexicon


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count_shard(url: str, caption_key: str) -> tuple[Counter, int]:
    return count_synsets(shard_captions([url], caption_key))


def count_shards(urls: list[str], caption_key: str, workers: int) -> tuple[Counter, int]:
    """Synset counts and the number of captions over all shards; shards are counted in any order."""
    lexicon()  # loaded once here, inherited by forked workers
    count = partial(count_shard, caption_key=caption_key)
    counts, captions = Counter(), 0
    with contextlib.ExitStack() as stack:
        if workers > 1:
            parts = stack.enter_context(multiprocessing.get_context("fork").Pool(workers)).imap_unordered(count, urls)
        else:
            parts = map(count, urls)
        for shard_counts, shard_captions_read in parts:
            counts.update(shard_counts)
            captions += shard_captions_read
    return counts, captions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="brace pattern or directory of .tar shards")
    parser.add_argument("--out", required=True, help="path of the vocabulary .tsv to write")
    parser.add_argument("--min-count", type=positive, default=1, help="keep synsets named by at least this many captions")
    parser.add_argument("--max-size", type=positive, default=None, help="keep at most this many synsets")
    parser.add_argument("--caption-key", default="txt", help="txt, or json:FIELD")
    parser.add_argument("--workers", type=positive, default=1, help="processes counting shards in parallel")
    args = parser.parse_args()
    start = time.perf_counter()

    def fail(message: str) -> int:
        print(f"build_synset_vocab: error: {message}", file=sys.stderr)
        return 2

    missing = missing_shards(args.shards)
    if missing or not expand_shards(args.shards):
        return fail(f"shard {missing[0]} does not exist" if missing else f"no shards match {args.shards}")
    counts, captions = count_shards(expand_shards(args.shards), args.caption_key, args.workers)
    if captions == 0:
        return fail(f"the shards {args.shards} hold no captions under '{args.caption_key}'")
    vocab = SynsetVocabulary.from_counts(counts, min_count=args.min_count, max_size=args.max_size)
    if len(vocab) == 0:
        top = max(counts.values(), default=0)
        return fail(f"no synset is named by {args.min_count} captions (the most frequent by {top}): lower --min-count")
    try:
        vocab.save(args.out)
    except OSError as e:
        return fail(f"cannot write {args.out}: {e}")
    print(f"wrote {args.out}: {len(vocab)} synsets of the {len(counts)} named in {captions} captions "
          f"(counts {vocab.counts[0]}..{vocab.counts[-1]}; {time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

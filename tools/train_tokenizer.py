"""Train a sentencepiece tokenizer on the captions of webdataset shards.

    python tools/train_tokenizer.py --shards "data/laion/{00000..00999}.tar" --out data/laion/tokenizer.model

Then train with model.text.tokenizer.model=<out> and model.text.vocab_size at least the printed size.
Only the caption members are read; no image is decoded.
"""

import argparse
import itertools
import time

from megaclip.data.samples import shard_captions
from megaclip.data.tokenizer import SentencePieceTokenizer, train_sentencepiece


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="brace pattern or directory of .tar shards")
    parser.add_argument("--out", required=True, help="path of the .model file to write")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "word", "char"])
    parser.add_argument("--caption-key", default="txt", help="txt, or json:FIELD")
    parser.add_argument("--max-captions", type=int, default=2_000_000, help="train on at most this many captions")
    args = parser.parse_args()
    start = time.perf_counter()
    captions = itertools.islice(shard_captions(args.shards, args.caption_key), args.max_captions)
    train_sentencepiece(captions, args.out, vocab_size=args.vocab_size, model_type=args.model_type)
    size = SentencePieceTokenizer(args.out, context_length=2).vocab_size
    print(f"wrote {args.out}: {size} pieces ({time.perf_counter() - start:.1f}s); train with "
          f"model.text.tokenizer.model={args.out} model.text.vocab_size>={size}")


if __name__ == "__main__":
    main()

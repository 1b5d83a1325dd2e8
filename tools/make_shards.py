"""Write webdataset shards for training.

    python tools/make_shards.py synthetic --out data/synthetic
"""

import argparse
import time

from megaclip.data.synthetic import write_synthetic_shards


def synthetic(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    shards = write_synthetic_shards(
        args.out, image_size=args.image_size, train_samples=args.train_samples,
        samples_per_shard=args.samples_per_shard, seed=args.seed,
    )
    print(f"wrote {shards.train_samples} train samples to {shards.train_shards}")
    print(f"wrote {shards.val_samples} val samples to {shards.val_shards}")
    print(f"tokenizer: {shards.tokenizer_model} ({time.perf_counter() - start:.1f}s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("synthetic", help="rendered shapes captioned 'a red circle at the top left'")
    p.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=16384)
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=synthetic)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()

"""Write webdataset shards for training.

    python tools/make_shards.py synthetic --out data/synthetic
    python tools/make_shards.py synthetic --objects 2 --out data/synthetic_two_objects
    python tools/make_shards.py folder --images photos/ --captions captions.csv --out data/photos --val-fraction 0.02

img2dataset's webdataset output (--output_format webdataset) needs no conversion: point
model.data.train_shards at its directory or at a brace pattern of its .tar files.
"""

import argparse
import time

from megaclip.data.folder_shards import write_folder_shards
from megaclip.data.synthetic import write_synthetic_shards


def synthetic(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    shards = write_synthetic_shards(
        args.out, image_size=args.image_size, train_samples=args.train_samples,
        samples_per_shard=args.samples_per_shard, seed=args.seed, objects=args.objects,
    )
    print(f"wrote {shards.train_samples} train samples to {shards.train_shards}")
    print(f"wrote {shards.val_samples} val samples to {shards.val_shards}")
    print(f"tokenizer: {shards.tokenizer_model} ({time.perf_counter() - start:.1f}s)")


def folder(args: argparse.Namespace) -> None:
    shards = write_folder_shards(
        args.images, args.captions, args.out, file_column=args.file_column, caption_column=args.caption_column,
        val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard, seed=args.seed,
    )
    print(f"wrote {shards.train_samples} train samples to {shards.train_shards}")
    print(f"wrote {shards.val_samples} val samples to {shards.val_shards}")
    if shards.skipped:
        print("left out: " + ", ".join(f"{n} ({reason})" for reason, n in shards.skipped.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("synthetic", help="rendered shapes captioned 'a red circle at the top left'")
    p.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=16384)
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objects", type=int, choices=(1, 2), default=1,
                   help="shapes per image; 2: the binding set, each val scene beside its colour swap")
    p.set_defaults(run=synthetic)
    p = modes.add_parser("folder", help="a folder of images and a captions table (CSV, or parquet with pyarrow)")
    p.add_argument("--images", required=True, help="folder the table's file names are relative to")
    p.add_argument("--captions", required=True, help=".csv with a header row, or .parquet (needs pyarrow)")
    p.add_argument("--out", required=True, help="output directory; must not hold shards yet")
    p.add_argument("--file-column", default="file")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of rows held out as the val split")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seeds the row shuffle and so the split")
    p.set_defaults(run=folder)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()

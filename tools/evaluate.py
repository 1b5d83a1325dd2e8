"""Evaluate a checkpoint on one device: retrieval and zero-shot classification (a CatLIP model, which
has no text tower, classifies from its head over its synset vocabulary and retrieves nothing).

    python tools/evaluate.py --checkpoint runs/clip/checkpoints                    # retrieval on the run's val split
    python tools/evaluate.py --checkpoint CKPT --val-shards "coco/val-{0000..0004}.tar"
    python tools/evaluate.py --checkpoint CKPT --zeroshot-folder imagenet/val --classes classes.txt
    python tools/evaluate.py --checkpoint CKPT --zeroshot-shards "in1k/val-{0000..0063}.tar" --classes classes.txt
    python tools/evaluate.py --checkpoint CKPT --synthetic-zeroshot shape          # synthetic val split
    python tools/evaluate.py --checkpoint CKPT --rerank-k 32    # a model with fusion layers: re-rank the top 32

Zero-shot labels: an image folder's i-th class subfolder in sorted order is class i; shards carry the
label in --label-key. --classes: one name per line, or `index<TAB>name` lines.
A failure ends with one line, ``evaluate: error: ...``, and exit code 2.
"""

import argparse
import contextlib
import sys

import torch

from megaclip.checkpoint import CheckpointError
from megaclip.checkpoint.model import load_model_for_inference
from megaclip.data import prepare
from megaclip.data.eval_loader import build_eval_loader
from megaclip.data.samples import DataError
from megaclip.data.synset_vocab import run_vocabulary
from megaclip.data.tokenizer import build_tokenizer
from megaclip.data.transforms import transforms_from_config
from megaclip.distributed import pick_device
from megaclip.evaluate import evaluate_retrieval
from megaclip.monitor import format_metrics
from megaclip.zeroshot import (OPENAI_TEMPLATES, evaluate_head_zeroshot, evaluate_zeroshot, image_folder_batches,
                               labelled_batches, read_class_names, read_templates, synthetic_task, zeroshot_classifier)


def report(name: str, metrics) -> None:
    print(f"{name}: {format_metrics(metrics)}", flush=True)


def report_zeroshot(name: str, results, source) -> None:
    if not results["images"]:
        raise ValueError(f"no usable images in {source}")
    report(name, results)


def evaluate(args: argparse.Namespace) -> None:
    # the cheap checks first: a wrong class file should not wait for a model to load
    classnames = read_class_names(args.classes) if args.classes else None
    templates = read_templates(args.templates)
    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no GPU is available")
    model, cfg = load_model_for_inference(args.checkpoint, device)
    m, autocast = cfg.model, contextlib.nullcontext()
    fusion = getattr(model, "fusion", None)
    if args.rerank_k and fusion is None:
        raise ValueError(f"--rerank-k: {args.checkpoint} has no fusion layers (model.fusion.num_layers=0) to re-rank with")
    rerank_k = 0 if fusion is None else args.rerank_k if args.rerank_k is not None else m.fusion.rerank_k
    if args.synthetic_zeroshot and args.val_shards is None and m.data.get("synthetic_objects", 1) != 1:
        raise ValueError(f"--synthetic-zeroshot labels the one object of a synthetic image; {args.checkpoint}'s val "
                         "split is the two-object set (model.data.synthetic_objects=2)")
    sources = prepare.resolve(m)
    val_shards = args.val_shards or sources.val_shards
    needs_val = model.text is not None or args.synthetic_zeroshot  # retrieval, or the synthetic labels
    if needs_val and val_shards is None:
        raise ValueError(f"{args.checkpoint} names no val split (model.data.val_shards): pass --val-shards")
    tokenizer = build_tokenizer(m.text.tokenizer.library, sources.tokenizer_model, m.text.encoder_seq_length)
    _, transform = transforms_from_config(m.vision)
    if model.text is None:  # CatLIP: no text tower to retrieve with; it classifies from its head
        if not (args.synthetic_zeroshot or args.zeroshot_folder or args.zeroshot_shards):
            raise ValueError(f"{args.checkpoint} is a model.loss={m.loss} model: it classifies from its head and "
                             "retrieves nothing: pass --synthetic-zeroshot, or --zeroshot-folder/--zeroshot-shards with --classes")
        vocabulary = run_vocabulary(m, sources.train_shards)

        def classify(names, batches):
            return evaluate_head_zeroshot(model, vocabulary, names, batches, device, autocast)
    else:
        def classify(names, batches):
            classifier = zeroshot_classifier(model, names, templates, tokenizer, device, autocast)
            return evaluate_zeroshot(model, classifier, batches, device, autocast)

    if needs_val:
        val = build_eval_loader(val_shards, m.data, dp_rank=0, dp_size=1,
                                batch_size=args.batch_size, image_transform=transform, tokenizer=tokenizer)
    if model.text is not None:
        metrics = evaluate_retrieval(model, val, device, autocast, rerank_k=rerank_k)
        if not val.samples:
            skipped = f" (skipped: {format_metrics(val.skipped)})" if val.skipped else ""
            raise ValueError(f"no usable samples in the val split {val_shards}{skipped}")
        report("retrieval", metrics)
        if val.skipped:
            report("skipped in the val split", val.skipped)
    if args.synthetic_zeroshot:
        task = synthetic_task(args.synthetic_zeroshot)
        report_zeroshot(f"zeroshot synthetic {args.synthetic_zeroshot}", classify(task.classnames, task.batches(val)),
                        val_shards)
    if args.zeroshot_folder:
        batches = image_folder_batches(args.zeroshot_folder, transform, batch_size=args.batch_size)
        if len(batches.dataset.classes) != len(classnames):
            raise ValueError(f"{args.zeroshot_folder} has {len(batches.dataset.classes)} class folders, "
                             f"{args.classes} {len(classnames)} names")
        report_zeroshot("zeroshot folder", classify(classnames, batches), args.zeroshot_folder)
    if args.zeroshot_shards:
        labelled = labelled_batches(shards=args.zeroshot_shards, data_cfg=m.data, image_transform=transform,
                                    tokenizer=tokenizer, batch_size=args.batch_size, label_key=args.label_key)
        report_zeroshot("zeroshot shards", classify(classnames, labelled), args.zeroshot_shards)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step directory, or a checkpoint root (its latest)")
    p.add_argument("--val-shards", help="retrieval split; default: the run's model.data.val_shards")
    p.add_argument("--zeroshot-folder", help="image folder with one subfolder per class")
    p.add_argument("--zeroshot-shards", help="webdataset split with a class label per sample")
    p.add_argument("--label-key", default="cls", help="member holding the label in --zeroshot-shards")
    p.add_argument("--classes", help="class names file (needed by --zeroshot-folder / --zeroshot-shards)")
    p.add_argument("--templates", default=str(OPENAI_TEMPLATES), help="prompt templates file")
    p.add_argument("--synthetic-zeroshot", choices=["shape", "colour"], help="zero-shot on the synthetic val split")
    p.add_argument("--rerank-k", type=int, help="re-rank each query's contrastive top k by the fusion layers' match "
                   "head (default: the run's model.fusion.rerank_k; 0: off)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if (args.zeroshot_folder or args.zeroshot_shards) and not args.classes:
        p.error("--zeroshot-folder and --zeroshot-shards need --classes")
    if args.rerank_k is not None and args.rerank_k < 0:
        p.error("--rerank-k must be >= 0")
    try:
        evaluate(args)
    except (CheckpointError, DataError, ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

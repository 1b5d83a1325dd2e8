"""Zero-shot classification: a classifier built from class names and prompt templates (or CatLIP's
head), top-k accuracy on labelled images (an image folder, a webdataset split with a label key, or the
synthetic val split), and on the same pass the linear probe's accuracy (megaclip.probe).

Labelled batches are (images, labels, keys) tuples, the keys naming the samples for the probe's split.

Class list file: one class name per line, or `index<TAB>name` lines covering 0..C-1 in any order.
Template file: one template per line, `{}` standing for the class name. In both, blank lines and
lines starting with # are ignored.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from megaclip.data.eval_loader import build_eval_loader
from megaclip.data.synthetic import COLOURS, POSITIONS, SHAPES
from megaclip.model.parallel import gather_tensor_parallel
from megaclip.probe import probe_accuracy

OPENAI_TEMPLATES = Path(__file__).resolve().parent / "data" / "templates" / "openai_imagenet_templates.txt"
TOP_K = (1, 5)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def _lines(path) -> List[str]:
    lines = (line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def read_class_names(path) -> List[str]:
    lines = _lines(path)
    if not any("\t" in line for line in lines):
        return [line.strip() for line in lines]
    try:
        indexed = {int(index): name.strip() for index, name in (line.split("\t", 1) for line in lines)}
    except ValueError:
        raise ValueError(f"{path}: with indices, every line must be 'index<TAB>name'") from None
    if sorted(indexed) != list(range(len(lines))):
        raise ValueError(f"{path}: indices must be 0..{len(lines) - 1}, each once")
    return [indexed[i] for i in range(len(lines))]


def read_templates(path=OPENAI_TEMPLATES) -> List[str]:
    templates = [line.strip() for line in _lines(path)]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"{path}: every template needs exactly one {{}}, e.g. 'a photo of a {{}}.' (got {bad[:1] or 'none'})")
    return templates


def _dp(dp_group):
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return 0, 1
    return dist.get_rank(dp_group), dist.get_world_size(dp_group)


@torch.no_grad()
def zeroshot_classifier(model, classnames: Sequence[str], templates: Sequence[str], tokenizer, device,
                        autocast, dp_group=None) -> torch.Tensor:
    """[D, C] on the CPU: per class, the mean of its normalized template embeddings, renormalized.
    Ranks of dp_group encode every dp_size-th class and share the results."""
    rank, size = _dp(dp_group)
    was_training = model.training
    model.eval()
    local = {}
    for index in range(rank, len(classnames), size):
        tokens = tokenizer([template.format(classnames[index]) for template in templates]).to(device)
        with autocast:
            embeddings = model.encode_text(tokens).float()
        local[index] = F.normalize(F.normalize(embeddings, dim=-1).mean(dim=0), dim=0).cpu()
    model.train(was_training)
    shares = [local]
    if size > 1:
        shares = [None] * size
        dist.all_gather_object(shares, local, group=dp_group)
    merged = {index: weights for share in shares for index, weights in share.items()}
    return torch.stack([merged[i] for i in range(len(classnames))], dim=1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=TOP_K) -> Dict[int, int]:
    """How many rows have their label among the k highest logits, for each k. Another class whose
    logit is not strictly lower (a tie, or NaN) ranks ahead of the label, so a classifier that cannot
    tell classes apart scores zero, never perfect."""
    label_logit = logits.gather(1, labels.unsqueeze(1))
    ahead = ~(logits < label_logit)
    ahead.scatter_(1, labels.unsqueeze(1), False)
    rank = ahead.sum(dim=1)
    return {k: int((rank < k).sum()) for k in ks}


@torch.no_grad()
def evaluate_zeroshot(model, classifier: torch.Tensor, batches: Iterable, device, autocast, dp_group=None,
                      ks=TOP_K, probe: bool = False) -> Dict[str, float]:
    """top-k accuracy over (images, labels[, keys]) batches; every rank of dp_group passes its share and
    gets the accuracy over all of them. With probe (batches with keys), also "probe_top1": the linear
    probe's accuracy on the normalized image features of the same images."""
    weights = classifier.to(device).float()

    def scores(images):
        features = model.encode_image(images).float()
        return features @ weights, features
    return _evaluate(model, scores, batches, device, autocast, dp_group, ks, classifier.shape[1] if probe else None)


def head_class_members(vocabulary, classnames: Sequence[str]) -> List[List[int]]:
    """For each class name, the vocabulary classes (synsets) it maps to; empty where it maps to none."""
    return [vocabulary.classes(name) for name in classnames]


def warn_unmapped_classes(vocabulary, classnames: Sequence[str]) -> None:
    """One line on stderr naming the classes CatLIP's head cannot score (no synset of the name is in
    its vocabulary): they are never predicted, so their images count as errors."""
    missing = [name for name, members in zip(classnames, head_class_members(vocabulary, classnames)) if not members]
    if missing:
        print(f"megaclip: warning: {len(missing)} of {len(classnames)} zero-shot classes name no synset in the CatLIP "
              f"vocabulary and are never predicted: {', '.join(missing)}", file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate_head_zeroshot(model, vocabulary, classnames: Sequence[str], batches: Iterable, device, autocast,
                           dp_group=None, ks=TOP_K, probe: bool = False) -> Dict[str, float]:
    """CatLIP's zero-shot classification, straight from its head: a class scores the highest logit
    among the synsets its name maps to (a name that maps to none never wins). With probe, as in
    evaluate_zeroshot, the probe sees the normalized image embedding (the head's input)."""
    members = head_class_members(vocabulary, classnames)
    head = model.catlip_head.weight

    def scores(images):
        embeddings = model.visual(images)
        # the logits of every synset: transposed, the classes lie along the head weight's split dim
        logits = gather_tensor_parallel(model.catlip_head(embeddings).float().T.contiguous(), head).T
        return torch.stack([logits[:, m].amax(dim=1) if m else torch.full_like(logits[:, 0], -torch.inf)
                            for m in members], dim=1), F.normalize(embeddings.float(), dim=-1)
    return _evaluate(model, scores, batches, device, autocast, dp_group, ks, len(classnames) if probe else None)


def _evaluate(model, scores, batches: Iterable, device, autocast, dp_group, ks, probe_classes) -> Dict[str, float]:
    """One pass: scores(images) -> (class scores, image features); the features are kept for the probe
    when probe_classes (the class count) is given."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(1 + len(ks), dtype=torch.float64)
    kept = []
    for images, labels, *keys in batches:
        with autocast:
            logits, features = scores(images.to(device))
        correct = topk_correct(logits.float().cpu(), labels, ks)
        totals += torch.tensor([len(labels), *(correct[k] for k in ks)], dtype=torch.float64)
        if probe_classes:
            if not keys:
                raise ValueError("the linear probe needs (images, labels, keys) batches: the keys split its samples")
            kept.append((features.float().cpu(), labels, keys[0]))
    model.train(was_training)
    if _dp(dp_group)[1] > 1:
        totals = totals.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(totals, group=dp_group)
    count, *hits = totals.cpu().tolist()
    results = {**{f"top{k}": h / max(count, 1) for k, h in zip(ks, hits)}, "images": int(count)}
    if probe_classes:
        features = torch.cat([f for f, *_ in kept]) if kept else torch.zeros(0, 0)
        labels = torch.cat([l for _, l, *_ in kept]) if kept else torch.zeros(0, dtype=torch.long)
        keys = [k for _, _, batch_keys in kept for k in batch_keys]
        probe = probe_accuracy(features, labels, keys, probe_classes, dp_group, device)
        results.update(probe_top1=probe["top1"], probe_images=probe["images"])
    return results


class _ImageFiles(Dataset):
    def __init__(self, root, items, classes, image_transform):
        self.root, self.items, self.classes, self.image_transform = root, items, classes, image_transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        with Image.open(path) as image:
            return self.image_transform(image.convert("RGB")), label, os.path.relpath(path, self.root)


def image_folder_batches(root, image_transform, *, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                         num_workers: int = 0) -> DataLoader:
    """(images, labels, keys) batches of root/<class>/<image>, this rank's every dp_size-th image; label i
    is the i-th class subfolder in sorted order (torchvision's ImageFolder order), listed in
    .dataset.classes; a key is the image's path under root."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    items = [(os.path.join(root, name, file), label) for label, name in enumerate(classes)
             for file in sorted(os.listdir(os.path.join(root, name))) if file.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise FileNotFoundError(f"no images in class subfolders of {root}")
    return DataLoader(_ImageFiles(root, items[dp_rank::dp_size], classes, image_transform), batch_size=batch_size,
                      num_workers=num_workers)


def labelled_batches(*, folder=None, shards=None, data_cfg, image_transform, tokenizer, batch_size: int,
                     label_key: str = "cls", dp_rank: int = 0, dp_size: int = 1) -> Iterable:
    """(images, labels, keys) batches of an image folder, or else of shards whose samples carry a label
    in ``label_key``: this data-parallel rank's share."""
    if folder:
        return image_folder_batches(folder, image_transform, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size)
    loader = build_eval_loader(shards, data_cfg, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size,
                               image_transform=image_transform, tokenizer=tokenizer, label_key=label_key)
    return ((batch.images, batch.labels, batch.keys) for batch in loader)


@dataclass(frozen=True)
class CaptionTask:
    """A zero-shot task on a captioned split, labels read off each image's first caption."""
    classnames: List[str]
    templates: List[str]
    label_of_caption: Callable[[str], int]

    def batches(self, eval_batches: Iterable) -> Iterator[tuple]:
        for batch in eval_batches:
            first = [batch.captions[int((batch.caption_image == i).nonzero()[0])] for i in range(len(batch.images))]
            yield batch.images, torch.tensor([self.label_of_caption(c) for c in first]), batch.keys


def synthetic_task(attribute: str = "shape") -> CaptionTask:
    """Name the shape (6 classes) or the colour (8) of synthetic images; the templates are every
    caption with that word left out, so the classifier averages over the other attributes."""
    positions = [phrase for phrase, _, _ in POSITIONS]
    if attribute == "shape":
        return CaptionTask(list(SHAPES), [f"a {c} {{}} {p}" for c in COLOURS for p in positions],
                           lambda caption: SHAPES.index(caption.split()[2]))
    if attribute == "colour":
        return CaptionTask(list(COLOURS), [f"a {{}} {s} {p}" for s in SHAPES for p in positions],
                           lambda caption: list(COLOURS).index(caption.split()[1]))
    raise ValueError(f"unknown synthetic zero-shot attribute '{attribute}' (choose shape or colour)")

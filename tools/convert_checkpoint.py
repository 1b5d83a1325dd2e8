"""Convert model weights between megaclip checkpoints, open_clip and Hugging Face CLIP, or reshard a
megaclip checkpoint to another TP size. Nothing is downloaded.

    python tools/convert_checkpoint.py open_clip-to-megaclip --model-name ViT-B-32 --pretrained ViT-B-32.pt --tp 2 --out ckpt/
    python tools/convert_checkpoint.py megaclip-to-open_clip --checkpoint ckpt/ --out exported/model.pt
    python tools/convert_checkpoint.py hf-to-megaclip --hf-dir clip-vit-base-patch32/ --tp 2 --out ckpt/
    python tools/convert_checkpoint.py megaclip-to-hf --checkpoint ckpt/ --out hf_model/
    python tools/convert_checkpoint.py megaclip-reshard --checkpoint ckpt/ --tp 4 --out ckpt_tp4/

megaclip-to-open_clip writes the state dict and, beside it with the suffix .json, open_clip's model
config: ``open_clip.add_model_config("exported/model.json")`` then
``open_clip.create_model("model", pretrained="exported/model.pt")`` loads it. megaclip-to-hf writes a
folder for ``transformers.CLIPModel.from_pretrained``. A model.loss=catlip checkpoint (no text tower)
exports its image tower alone: open_clip's ``model.visual`` state dict (``model.visual.load_state_dict``
after ``create_model``; the config's text tower is a placeholder) and HF's
``CLIPVisionModelWithProjection`` folder; its class head is left out. Converted checkpoints carry clip_tiny's training
settings with the source's architecture and no data (set model.data.* to train from them).
A failure ends with one line, ``convert_checkpoint: error: ...``, and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megaclip.checkpoint import CheckpointError, read_full_model_state, write_model_checkpoint
from megaclip.convert import architecture, import_library, megaclip_config
from megaclip.convert.open_clip import from_open_clip, open_clip_model_config, to_open_clip


def open_clip_to_megaclip(args: argparse.Namespace) -> None:
    if args.model_name.startswith("hf-hub:"):
        raise ValueError(f"{args.model_name}: hf-hub models are downloaded; name a built-in or local-dir: model")
    open_clip = import_library("open_clip")
    model_cfg = open_clip.get_model_config(args.model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model '{args.model_name}'")
    if not Path(args.pretrained).is_file():
        raise ValueError(f"no such file: {args.pretrained}")
    model = open_clip.create_model(args.model_name, pretrained=None)
    try:
        open_clip.load_checkpoint(model, args.pretrained)
    except Exception as e:  # unpickling errors of all kinds, or load_state_dict's many-line key report
        raise ValueError(f"cannot load {args.pretrained} into open_clip {args.model_name}: {_one_line(e)}") from None
    overrides, full = from_open_clip(model.state_dict(), model_cfg)
    _write(full, overrides, args)


def megaclip_to_open_clip(args: argparse.Namespace) -> None:
    full, cfg = read_full_model_state(args.checkpoint)
    state_dict = to_open_clip(full, cfg.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out)
    out.with_suffix(".json").write_text(json.dumps(open_clip_model_config(cfg.model), indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def hf_to_megaclip(args: argparse.Namespace) -> None:
    from megaclip.convert.hf import from_hf, transformers  # transformers takes seconds to import: HF modes only

    if not (Path(args.hf_dir) / "config.json").is_file():
        raise ValueError(f"not a Hugging Face model folder (no config.json): {args.hf_dir}")
    model = transformers.CLIPModel.from_pretrained(args.hf_dir)
    overrides, full = from_hf(model.state_dict(), model.config)
    _write(full, overrides, args)


def megaclip_to_hf(args: argparse.Namespace) -> None:
    from megaclip.convert.hf import hf_model, to_hf  # transformers takes seconds to import: HF modes only

    full, cfg = read_full_model_state(args.checkpoint)
    state_dict, config = to_hf(full, cfg.model)
    model = hf_model(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # weights whose shapes differ from the checkpoint's config
        raise ValueError(f"{args.checkpoint}: the weights do not fit the config: {_one_line(e)}") from None
    model.save_pretrained(args.out)
    print(f"wrote {args.out}")


def reshard(args: argparse.Namespace) -> None:
    full, cfg = read_full_model_state(args.checkpoint)
    megaclip_config(architecture(cfg.model), args.tp)  # raises for a TP the model cannot split to
    print(f"wrote {write_model_checkpoint(args.out, full, cfg, args.tp)}")


def _write(full, overrides, args: argparse.Namespace) -> None:
    path = write_model_checkpoint(args.out, full, megaclip_config(overrides, args.tp), args.tp)
    print(f"wrote {path}")


def _one_line(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line, cut short: load_state_dict lists every key."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True)

    m = modes.add_parser("open_clip-to-megaclip", help="an open_clip state dict or checkpoint file")
    m.add_argument("--model-name", required=True, help="open_clip model name, e.g. ViT-B-32, or local-dir:FOLDER")
    m.add_argument("--pretrained", "--state-dict", dest="pretrained", required=True,
                   help="the weights: a state dict or an open_clip training checkpoint")
    m.set_defaults(run=open_clip_to_megaclip)

    m = modes.add_parser("megaclip-to-open_clip", help="state dict FILE.pt + open_clip model config FILE.json")
    m.add_argument("--checkpoint", required=True, help="checkpoint root or step directory")
    m.add_argument("--out", required=True, help="the .pt file to write")
    m.set_defaults(run=megaclip_to_open_clip)

    m = modes.add_parser("hf-to-megaclip", help="a Hugging Face CLIPModel folder")
    m.add_argument("--hf-dir", required=True)
    m.set_defaults(run=hf_to_megaclip)

    m = modes.add_parser("megaclip-to-hf", help="a folder for CLIPModel.from_pretrained")
    m.add_argument("--checkpoint", required=True, help="checkpoint root or step directory")
    m.add_argument("--out", required=True)
    m.set_defaults(run=megaclip_to_hf)

    m = modes.add_parser("megaclip-reshard", help="the model weights at another TP size")
    m.add_argument("--checkpoint", required=True, help="checkpoint root or step directory")
    m.set_defaults(run=reshard)

    for name in ("open_clip-to-megaclip", "hf-to-megaclip", "megaclip-reshard"):
        modes.choices[name].add_argument("--tp", type=int, default=1, help="TP size to write the checkpoint at")
        modes.choices[name].add_argument("--out", required=True, help="checkpoint root to write")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

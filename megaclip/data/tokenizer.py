"""Caption tokenizers: text -> fixed-length rows of token ids, [sot] + pieces + [eot] + padding."""

import io
import os
from typing import Iterable, Optional, Union

import sentencepiece as spm
import torch

from megaclip.data import clip_bpe
from megaclip.data.clip_bpe import ClipBpeTokenizer

PAD_ID, UNK_ID, SOT_ID, EOT_ID = 0, 1, 2, 3


def train_sentencepiece(captions: Iterable[str], model_path: str, vocab_size: int = 64, model_type: str = "unigram") -> str:
    """Train a sentencepiece model on captions and write it to model_path atomically."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        # a small caption vocabulary may not fill vocab_size pieces; accept fewer
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=SOT_ID,
        eos_id=EOT_ID,
        minloglevel=2,
    )
    partial = f"{model_path}.partial-{os.getpid()}"
    with open(partial, "wb") as f:
        f.write(model.getvalue())
    os.replace(partial, model_path)
    return model_path


class SentencePieceTokenizer:
    def __init__(self, model_path: str, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (sot + eot), got {context_length}")
        if not model_path or not os.path.isfile(model_path):  # sentencepiece's own error is a RuntimeError
            raise FileNotFoundError(f"sentencepiece tokenizer model not found: {model_path}")
        self.processor = spm.SentencePieceProcessor(model_file=model_path)
        p = self.processor
        if p.pad_id() != PAD_ID or p.bos_id() < 0 or p.eos_id() != EOT_ID:
            raise ValueError(f"{model_path} needs pad id {PAD_ID}, a bos piece and eos id {EOT_ID} (tools/train_tokenizer.py "
                             f"makes such models); has pad {p.pad_id()} bos {p.bos_id()} eos {p.eos_id()}")
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def sot_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eot_id(self) -> int:
        return self.processor.eos_id()

    def __call__(self, texts: list[str]) -> torch.LongTensor:
        tokens = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, pieces in enumerate(self.processor.encode(list(texts))):
            # truncate the pieces, never the eot: the text tower pools at the eot position
            ids = [self.sot_id, *pieces[: self.context_length - 2], self.eot_id]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens


def end_of_text_id(library: str) -> int:
    """The id that ends every row of a tokenizer library's captions: the text tower pools there."""
    if library == "sentencepiece":
        return EOT_ID  # checked when a model file is loaded
    if library == "clip_bpe":
        return clip_bpe.EOT_ID
    raise ValueError(f"unknown tokenizer library '{library}' (choose sentencepiece or clip_bpe)")


def build_tokenizer(library: str, model_path: Optional[str], context_length: int) -> Union[SentencePieceTokenizer, ClipBpeTokenizer]:
    if library == "sentencepiece":
        return SentencePieceTokenizer(model_path, context_length)
    if library == "clip_bpe":  # CLIP's vocabulary ships with megaclip: no model file
        return ClipBpeTokenizer(context_length)
    raise ValueError(f"unknown tokenizer library '{library}' (choose sentencepiece or clip_bpe)")

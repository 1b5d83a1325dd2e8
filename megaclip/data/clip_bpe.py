"""CLIP's byte-level BPE tokenizer: OpenAI's 49 408-id vocabulary, giving the same ids as open_clip's
default tokenizer (``open_clip.tokenize``).

It is written out here because no core dependency offers CLIP's exact byte-level BPE offline:
open_clip brings torchvision and timm along, and Hugging Face's tokenizers fetch their vocabulary
from the hub. The merges ship beside this module (bpe_simple_vocab_16e6.txt.gz, MIT-licensed by
OpenAI: see CLIP_BPE_LICENSE).

A caption is cleaned (ftfy's mojibake repair, HTML entities unescaped, whitespace collapsed, lower
case), split into words, numbers and punctuation runs, and each piece, as UTF-8 bytes mapped to
printable characters, is merged pair by pair in the order the merges file ranks them.
"""
from __future__ import annotations

import gzip
import html
from pathlib import Path
from typing import Dict, List

import ftfy
import regex
import torch

MERGES_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48 894 merges: 512 byte symbols + merges + 2 specials
VOCAB_SIZE = 49408
PAD_ID, SOT_ID, EOT_ID = 0, 49406, 49407
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
END_OF_WORD = "</w>"
# Special tokens, English contractions, letter runs, single digits, runs of anything else but spaces.
PIECES = regex.compile("|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                       regex.IGNORECASE)
_CACHE_LIMIT = 1 << 16  # pieces whose ids are kept; a plain dict so the tokenizer pickles for loader workers


def byte_symbols() -> Dict[int, str]:
    """A printable character for each byte, so that BPE never sees spaces or control characters:
    printable Latin-1 bytes stand for themselves, the others (in byte order) for chr(256), chr(257), ...
    The dict's order, printable bytes first, is the order of the vocabulary's first 256 ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    symbols.update((b, chr(256 + n)) for n, b in enumerate(b for b in range(256) if b not in symbols))
    return symbols


def clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipBpeTokenizer:
    vocab_size = VOCAB_SIZE
    pad_id, sot_id, eot_id = PAD_ID, SOT_ID, EOT_ID

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (sot + eot), got {context_length}")
        self.context_length = context_length
        with gzip.open(MERGES_FILE, "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:NUM_MERGES + 1]]
        self.byte_symbols = byte_symbols()
        symbols = list(self.byte_symbols.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        self.ids = {piece: i for i, piece in enumerate(vocab)}
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.cache: Dict[str, List[int]] = {}
        if len(self.ids) != VOCAB_SIZE or self.ids[SPECIAL_TOKENS[0]] != SOT_ID:
            raise ValueError(f"{MERGES_FILE} does not hold CLIP's vocabulary ({len(self.ids)} ids)")

    def encode(self, text: str) -> List[int]:
        """Token ids of a caption, without start/end of text."""
        ids = []
        for piece in PIECES.findall(clean(text)):
            ids += self._piece_ids(piece)
        return ids

    def __call__(self, texts: List[str]) -> torch.LongTensor:
        tokens = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            # truncate the caption, never the eot: the text tower pools at the eot position
            ids = [self.sot_id, *self.encode(text)[: self.context_length - 2], self.eot_id]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens

    def _piece_ids(self, piece: str) -> List[int]:
        if piece in SPECIAL_TOKENS:
            return [self.ids[piece]]
        if piece not in self.cache:
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache.clear()
            symbols = "".join(self.byte_symbols[b] for b in piece.encode("utf-8"))
            self.cache[piece] = [self.ids[s] for s in self._merge(symbols)]
        return self.cache[piece]

    def _merge(self, word: str) -> List[str]:
        """Apply the best-ranked merge to every adjacent pair it matches, left to right, until no pair
        of neighbours has a merge; the last symbol carries the end-of-word mark."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            rank, first, second = min((self.merge_rank.get(pair, len(self.merge_rank)), *pair)
                                      for pair in zip(parts, parts[1:]))
            if rank == len(self.merge_rank):
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

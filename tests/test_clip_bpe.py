"""megaclip's CLIP BPE tokenizer gives open_clip's ids, works without open_clip, and keeps the eot."""
import pickle
import subprocess
import sys

import pytest
import torch

from megaclip.convert import import_library
from megaclip.data.clip_bpe import ClipBpeTokenizer
from megaclip.data.tokenizer import build_tokenizer

open_clip = import_library("open_clip")

CAPTIONS = [
    "a photo of a cat",
    "",
    "   lots   of \t extra\n\nwhitespace   ",
    "Café crème brûlée, naïve façade: ÄÖÜ ß ﬁ",
    "emoji 😀 🐱‍👤 👍🏽 🇫🇷",
    "北京欢迎你 東京タワー 서울의 밤",
    "Tom &amp; Jerry &lt;3 &#39;quoted&#39; &amp;amp; twice",
    "It's they're we've I'm you'll he'd DON'T",
    "1234567890 3.14159 1,000,000 $5.99 50%",
    "!!!??? ... --- ((()))  <>  @#$^*_+= `~|\\",
    "schÃ¶n mojibake and a\u00a0no-break space and a zero\u200bwidth one",
    "मराठी العربية עברית ไทย Ελληνικά русский",
    "<start_of_text> spelled out <END_OF_TEXT>",
    "a very long caption " + " ".join(f"word{i} and more" for i in range(60)),
]


@pytest.fixture(scope="module")
def tokenizer():
    return ClipBpeTokenizer()


def test_same_ids_as_open_clip(tokenizer):
    ours = tokenizer(CAPTIONS)
    assert ours.shape == (len(CAPTIONS), 77) and ours.dtype == torch.long
    assert torch.equal(ours, open_clip.get_tokenizer("ViT-B-32")(CAPTIONS))
    assert torch.equal(ours, open_clip.tokenize(CAPTIONS))


def test_known_ids_and_special_tokens(tokenizer):
    row = tokenizer(["a photo of a cat"])[0]
    assert row[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and not row[7:].any()
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id) == (49408, 0, 49406, 49407)
    assert tokenizer([""])[0, :3].tolist() == [49406, 49407, 0]


def test_truncation_keeps_the_eot_last():
    short = ClipBpeTokenizer(context_length=8)
    rows = short(CAPTIONS)
    assert torch.equal(rows, open_clip.get_tokenizer("ViT-B-32")(CAPTIONS, context_length=8))
    long_row = rows[-1]
    assert long_row[0] == short.sot_id and long_row[-1] == short.eot_id and (long_row != short.pad_id).all()
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        ClipBpeTokenizer(context_length=1)


def test_build_tokenizer_needs_no_model_file():
    tokenizer = build_tokenizer("clip_bpe", None, 16)
    assert isinstance(tokenizer, ClipBpeTokenizer) and tokenizer(["a cat"]).shape == (1, 16)


def test_pickles_for_loader_workers(tokenizer):
    assert torch.equal(pickle.loads(pickle.dumps(tokenizer))(CAPTIONS), tokenizer(CAPTIONS))


def test_works_without_open_clip():
    code = ("import sys; sys.modules['open_clip'] = None\n"  # any import of open_clip now fails
            "from megaclip.data.clip_bpe import ClipBpeTokenizer\n"
            "print(ClipBpeTokenizer(8)(['a photo of a cat'])[0].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[49406, 320, 1125, 539, 320, 2368, 49407, 0]"

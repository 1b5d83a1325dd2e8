"""Caption -> WordNet synsets -> CatLIP vocabulary and targets.

The expected synsets were read by hand from the WordNet 3.0 files (index.noun: a lemma's first offset;
data.noun: that synset's first lemma), the same answers NLTK's wn.synset(lemma + ".n.01") gives.
"""
import gzip
import importlib.util
import os
import subprocess
import sys
from collections import Counter
from fnmatch import fnmatch

import pytest
import torch

from megaclip.data import synsets as synsets_module
from megaclip.data.samples import DataError, shard_captions
from megaclip.data.synset_vocab import SynsetVocabulary
from megaclip.data.synsets import NounLexicon, Synset, caption_synsets, lexicon
from megaclip.data.synthetic import COLOURS, SHAPES, write_synthetic_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.dirname(synsets_module.__file__)
WORDNET_DIR = "/usr/share/wordnet"  # Debian's wordnet-base

RED, CIRCLE, TOP, LEFT = "n04962784", "n13873502", "n08663860", "n08625462"
DOG, CAT, MAT, BOX, GLASS = "n02084071", "n02121620", "n03727837", "n02883344", "n14881303"
MOUSE, CHILD, MAN, TOOTH = "n02330245", "n09917593", "n10287213", "n05282746"
HOTDOG, ICE_CREAM, LIVING_ROOM, RED_CROSS = "n10187710", "n07614500", "n03679712", "n08047747"


def names(caption):
    return [s.name for s in lexicon().caption_synsets(caption)]


@pytest.mark.parametrize("caption, expected", [
    ("a red circle at the top left", [RED, CIRCLE, TOP, LEFT]),  # colours and positions are nouns too
    ("a red cross at the top", [RED_CROSS, TOP]),  # the longest noun wins: the organisation
    ("The CAT sat on the mat.", [CAT, MAT]),
    ("two dogs, three boxes and glasses", [DOG, BOX, GLASS]),  # s, xes, and glasses -> glass (shortest)
    ("mice, children, men and teeth", [MOUSE, CHILD, MAN, TOOTH]),  # irregular plurals from noun.exc
    ("a dog's toy", [DOG]),  # possessive stripped; toy's first sense is plaything.n.01: not a head
    ("a zorblax next to the qwibble dog", [DOG]),  # unknown words ignored
    ("hot dogs and ice cream in the living room", [HOTDOG, ICE_CREAM, LIVING_ROOM]),  # phrases, not dog
    ("a dog and a dog", [DOG]),  # each synset once
    ("it is at a photo", []),  # 'a' (angstrom), 'at' (astatine), 'it' (IT); photo -> photograph.n.01
    ("one can may", []),  # function words whose first noun sense is their own
    ("", []),
])
def test_caption_synsets_hand_checked(caption, expected):
    assert caption_synsets(caption) == expected


def test_synset_names():
    assert names("a red circle at the top left") == ["red.n.01", "circle.n.01", "top.n.01", "left.n.01"]
    assert names("hot dogs") == ["hotdog.n.01"]  # a phrase keeps its first sense whatever its name
    assert names("polar bears") == ["ice_bear.n.01"]


def test_morphy_keeps_nltks_stopping_rule():
    nouns = NounLexicon({"box": Synset("n1", "box.n.01"), "boxe": Synset("n2", "boxe.n.01"),
                         "bo": Synset("n3", "bo.n.01")}, {"oxen": ("ox",)})
    assert nouns.lemmas("boxes") == ["boxe", "box"]  # one round of detachments, all known ones
    assert nouns.lemmas("bos") == ["bo"]
    assert nouns.lemmas("boxess") == ["boxe", "box"]  # nothing known after one round: detach again
    assert nouns.lemmas("oxen") == []  # the exception list decides alone, and "ox" is not in this table


def test_shipped_table_loads_offline_and_is_package_data():
    nouns = lexicon()  # the files shipped beside megaclip/data/synsets.py
    assert len(nouns.first_senses) > 100_000 and nouns.exceptions["mice"] == ("mouse",)
    assert nouns.first_senses["dog"] == Synset(DOG, "dog.n.01")
    with open(os.path.join(DATA, "WORDNET_LICENSE")) as f:
        assert "WordNet 3.0 Copyright 2006 by Princeton University" in f.read()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["megaclip.data"]
    for shipped in ("wordnet_nouns.tsv.gz", "wordnet_noun_exc.txt.gz", "WORDNET_LICENSE"):
        assert any(fnmatch(shipped, pattern) for pattern in patterns), shipped


@pytest.mark.skipif(not os.path.isfile(os.path.join(WORDNET_DIR, "index.noun")),
                    reason="needs the WordNet 3.0 database (apt-get install wordnet-base)")
def test_table_tool_regenerates_the_shipped_table(tmp_path):
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_wordnet_table.py"),
                    "--wordnet-dir", WORDNET_DIR, "--out-dir", str(tmp_path)], check=True, capture_output=True)
    for name in ("wordnet_nouns.tsv.gz", "wordnet_noun_exc.txt.gz"):
        # contents, not bytes: another zlib may compress the same text differently
        with gzip.open(tmp_path / name) as new, gzip.open(os.path.join(DATA, name)) as shipped:
            assert new.read() == shipped.read(), name
    with open(tmp_path / "WORDNET_LICENSE") as new, open(os.path.join(DATA, "WORDNET_LICENSE")) as shipped:
        assert new.read() == shipped.read()


def test_vocabulary_multi_hot_and_round_trip(tmp_path):
    vocab = SynsetVocabulary([(Synset(DOG, "dog.n.01"), 5), (Synset(RED, "red.n.01"), 3), (Synset(CAT, "cat.n.01"), 1)])
    targets = vocab.multi_hot(["a red dog", "a cat on a mat", "nothing here", "red red dogs and a red cat"])
    assert targets.shape == (4, 3) and targets.dtype == torch.float32
    assert torch.equal(targets, torch.tensor([[1.0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 1, 1]]))  # mat: not a class
    vocab.save(tmp_path / "v.tsv")
    loaded = SynsetVocabulary.load(tmp_path / "v.tsv")
    assert loaded.synsets == vocab.synsets and loaded.counts == [5, 3, 1] and loaded.index[CAT] == 2


@pytest.mark.parametrize("text, complaint", [
    ("", "first line must be"),
    ("synset\tname\tcount\n", "holds no synsets"),
    ("synset\tname\tcount\nn02084071\tdog.n.01\n", "line 2: expected"),
    ("synset\tname\tcount\nn02084071\tdog.n.01\t1\nn02084071\tdog.n.01\t1\n", "twice"),
])
def test_bad_vocabulary_file_is_one_line(tmp_path, text, complaint):
    (tmp_path / "v.tsv").write_text(text)
    with pytest.raises(DataError, match=complaint) as error:
        SynsetVocabulary.load(tmp_path / "v.tsv")
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", image_size=16,
                                  train_samples=256, samples_per_shard=64, seed=0)


def run_vocab_tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_synset_vocab.py"), *map(str, args)],
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120)


def vocab_tool_main(monkeypatch, *args) -> int:
    """The tool in this process: no interpreter start-up for each case."""
    spec = importlib.util.spec_from_file_location("build_synset_vocab", os.path.join(REPO, "tools", "build_synset_vocab.py"))
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_synset_vocab", tool)  # its workers unpickle functions by module name
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, "argv", ["build_synset_vocab.py", *map(str, args)])
    return tool.main()


def synthetic_counts(shards):
    """The oracle: which words of a synthetic caption are nouns, counted by string matching. "red cross"
    is a WordNet noun itself (the organisation): the longer match wins over its two words."""
    counts = Counter()
    for caption in shard_captions(shards):
        if "red cross" in caption:
            counts["red_cross.n.01"] += 1
            caption = caption.replace("red cross", "")
        words = caption.split()
        counts.update(f"{word}.n.01" for word in words
                      if word in COLOURS or word in SHAPES or word in ("top", "bottom", "left", "right", "center"))
    return counts


def test_build_vocabulary_from_shards_honours_min_count_and_max_size(tmp_path, synthetic, monkeypatch):
    expected = synthetic_counts(synthetic.train_shards)
    assert len(expected) == 20  # 8 colours, 6 shapes, 5 position words, red_cross
    min_count = sorted(expected.values())[5] + 1  # drops at least six synsets, keeps more than ten
    proc = run_vocab_tool("--shards", synthetic.train_shards, "--min-count", min_count, "--max-size", 10,
                          "--workers", 2, "--out", tmp_path / "v.tsv")
    assert proc.returncode == 0, proc.stderr
    vocab = SynsetVocabulary.load(tmp_path / "v.tsv")
    kept = {s.name: c for s, c in zip(vocab.synsets, vocab.counts)}
    assert len(vocab) == 10 and vocab.counts == sorted(vocab.counts, reverse=True)
    assert all(expected[name] == count >= min_count for name, count in kept.items())
    assert all(name in kept for name, count in expected.items() if count > vocab.counts[-1])  # the most frequent

    assert vocab_tool_main(monkeypatch, "--shards", synthetic.train_shards, "--out", tmp_path / "all.tsv") == 0
    everything = SynsetVocabulary.load(tmp_path / "all.tsv")  # one process, this time
    assert {s.name: c for s, c in zip(everything.synsets, everything.counts)} == expected
    assert everything.counts == sorted(everything.counts, reverse=True)


@pytest.mark.parametrize("args", [
    ["--shards", "{tmp}/none-{{0..3}}.tar"],
    ["--shards", "{tmp}/empty"],
    ["--shards", "{train}", "--min-count", "1000000000"],
])
def test_build_vocabulary_bad_input_is_one_line_and_keeps_the_output(args, tmp_path, synthetic, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "v.tsv"
    out.write_text("keep me\n")
    args = [arg.format(tmp=tmp_path, train=synthetic.train_shards) for arg in args]
    assert vocab_tool_main(monkeypatch, *args, "--out", out) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("build_synset_vocab: error: ") and stderr.count("\n") == 1, stderr
    assert out.read_text() == "keep me\n"

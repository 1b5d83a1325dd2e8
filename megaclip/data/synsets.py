"""Caption -> WordNet 3.0 noun synsets: the classes CatLIP learns from.

Each word of a caption is reduced to its noun lemma ("mice" -> "mouse") and mapped to the lemma's first
noun sense, as CatLIP's reference code does with NLTK (``wn.synset(lemma + ".n.01")``, kept only when
that synset is named ``lemma.n.01``, i.e. the lemma heads its own first sense). That test is what keeps
WordNet's abbreviation senses of function words out ("a" -> angstrom.n.01, "at" -> astatine.n.01,
"it" -> information_technology.n.01); it also drops a word whose first sense is named after a synonym
("photo" -> photograph.n.01), as the reference does. Three departures, all for captions:

- Multi-word nouns WordNet knows ("ice cream", "hot dogs") are matched first, longest first, up to three
  words, and map to their first sense whatever its name ("hot_dog" -> hotdog.n.01): a phrase is never
  a function word, so the head test has nothing to guard there.
- A word in FUNCTION_WORDS is skipped. The reference tags parts of speech but does not use the tags;
  offline we have no tagger, and these closed-class words pass the head test ("can" -> can.n.01,
  "may" -> may.n.01, "one" -> one.n.01) while being nouns almost never in a caption.
- Of several lemma candidates ("glasses" -> glasses, glass) the shortest that heads its first sense is
  taken, where the reference takes the shortest and then tests it, losing "gas" (-> "ga", gallium)
  and "men" (-> "men", work_force.n.01).

WordNet is read from a table derived once from the WordNet database files by
tools/build_wordnet_table.py and shipped beside this module with WordNet's licence (WORDNET_LICENSE),
so nothing is downloaded. Lemmatisation is NLTK's morphy for nouns, written out here because NLTK's
WordNet reader needs its own packaging of the database (lexnames, index.sense, its data directory).
A synset id is its WordNet offset with the part of speech in front, "n02084071" (ImageNet's form).
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

NOUNS_FILE = Path(__file__).with_name("wordnet_nouns.tsv.gz")
EXCEPTIONS_FILE = Path(__file__).with_name("wordnet_noun_exc.txt.gz")
MAX_PHRASE_WORDS = 3  # the table holds nouns of up to three words

# morphy's detachment rules for nouns, in NLTK's order
NOUN_SUFFIXES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                 ("men", "man"), ("ies", "y"))

# Closed-class words: determiners, pronouns, numerals, prepositions, conjunctions, auxiliaries and modals,
# wh-words, deictic adverbs
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every either neither all both few many much more most
less least several enough no none other another such what which whose whatever
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves one ones oneself who whom
zero two three four five six seven eight nine ten eleven twelve hundred thousand million
first second third fourth fifth
about above across after against along amid among around as at before behind below beneath beside
besides between beyond but by despite down during except for from in inside into like near of off on
onto opposite out outside over past per round since than through throughout till to toward towards
under underneath unlike until up upon via with within without
and or nor so yet if because although though unless whereas while whether
am is are was were be been being have has had having do does did doing done
can could may might must shall should will would ought
when where why how here there now then also not very too just only even still again
""".split())

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # letter runs; an apostrophe inside keeps a word whole


@dataclass(frozen=True)
class Synset:
    id: str  # "n02084071"
    name: str  # "dog.n.01"


def caption_words(caption: str) -> list[str]:
    """Lower-cased words of a caption, possessives stripped ("dog's" -> "dog")."""
    words = WORD.findall(caption.lower().replace("\u2019", "'"))
    return [w[:-2] if w.endswith("'s") else w for w in words]


class NounLexicon:
    """WordNet's nouns: lemma -> first noun synset, and the irregular plurals."""

    def __init__(self, first_senses: dict[str, Synset], exceptions: dict[str, tuple[str, ...]]):
        self.first_senses = first_senses
        self.exceptions = exceptions
        # A phrase's inflection changes only its last word, so a phrase can be a noun only if the words
        # before its last one begin a multi-word lemma: a quick test that spares most lookups.
        self.phrase_heads = {form.rsplit("_", 1)[0] for form in [*first_senses, *exceptions] if "_" in form}
        # caption words are few and repeat (Zipf): remembering the answers makes most lookups free
        self.synset = lru_cache(maxsize=1 << 17)(self._synset)

    @classmethod
    def load(cls, nouns_file=NOUNS_FILE, exceptions_file=EXCEPTIONS_FILE) -> NounLexicon:
        first_senses = {}
        with gzip.open(nouns_file, "rt", encoding="utf-8") as f:
            for line in f:
                if line.startswith("#"):
                    continue
                lemma, offset, *name = line.rstrip("\n").split("\t")
                first_senses[lemma] = Synset(f"n{offset}", name[0] if name else f"{lemma}.n.01")
        with gzip.open(exceptions_file, "rt", encoding="utf-8") as f:
            exceptions = {inflected: tuple(bases) for inflected, *bases in map(str.split, f)}
        return cls(first_senses, exceptions)

    def lemmas(self, form: str) -> list[str]:
        """NLTK's morphy for nouns: the exception list, else the form and its detachments that WordNet
        knows, detaching again only while none is known."""
        if form in self.exceptions:
            return self._known([form, *self.exceptions[form]])
        forms = _detach([form])
        found = self._known([form, *forms])
        while not found and forms:
            forms = _detach(forms)
            found = self._known(forms)
        return found

    def _synset(self, words: tuple[str, ...]) -> Optional[Synset]:
        """The synset a word, or a phrase of words, stands for in a caption; None if none."""
        if len(words) == 1 and words[0] in FUNCTION_WORDS:
            return None
        for lemma in sorted(self.lemmas("_".join(words)), key=len):
            synset = self.first_senses[lemma]
            if len(words) > 1 or synset.name == f"{lemma}.n.01":
                return synset
        return None

    def caption_synsets(self, caption: str) -> list[Synset]:
        """The distinct synsets of a caption, in order; the longest phrase at each word wins."""
        words = caption_words(caption)
        found = {}
        start = 0
        while start < len(words):
            for length in range(min(MAX_PHRASE_WORDS, len(words) - start), 0, -1):
                if length > 1 and "_".join(words[start:start + length - 1]) not in self.phrase_heads:
                    continue
                synset = self.synset(tuple(words[start:start + length]))
                if synset is not None:
                    found.setdefault(synset, None)
                    break
            start += length
        return list(found)

    def _known(self, forms: list[str]) -> list[str]:
        return [form for form in dict.fromkeys(forms) if form in self.first_senses]


def _detach(forms: list[str]) -> list[str]:
    return list(dict.fromkeys(form[:-len(old)] + new for form in forms for old, new in NOUN_SUFFIXES
                              if form.endswith(old)))


@lru_cache(maxsize=1)
def lexicon() -> NounLexicon:
    """The shipped WordNet 3.0 nouns (loaded once per process: about a second)."""
    return NounLexicon.load()


def caption_synsets(caption: str) -> list[str]:
    """Synset ids of a caption: "a red circle at the top left" -> red.n.01, circle.n.01, top.n.01,
    left.n.01 as ["n04962784", "n13873502", "n08663860", "n08625462"]."""
    return [synset.id for synset in lexicon().caption_synsets(caption)]

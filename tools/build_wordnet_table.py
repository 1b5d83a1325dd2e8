"""Derive megaclip's WordNet 3.0 noun table from the WordNet database files.

    apt-get install wordnet-base          # Debian/Ubuntu: the WordNet 3.0 files in /usr/share/wordnet
    python tools/build_wordnet_table.py --wordnet-dir /usr/share/wordnet --out-dir megaclip/data

Writes, into --out-dir, the three files megaclip ships so that caption -> synset works offline:

- wordnet_nouns.tsv.gz: one line per noun lemma a caption can spell (letters, up to three words joined
  by "_"): ``lemma<TAB>offset`` of the lemma's first noun sense (the first offset in index.noun, which is
  what NLTK's ``wn.synset(lemma + ".n.01")`` returns), plus ``<TAB>name`` when that synset's name is not
  ``lemma.n.01`` (NLTK's name: the synset's first lemma, ".n.", that lemma's sense number).
- wordnet_noun_exc.txt.gz: noun.exc, WordNet's irregular plurals (``mice mouse``), as distributed.
- WORDNET_LICENSE: the WordNet 3.0 licence, taken from the header of index.noun.

Only index.noun, data.noun and noun.exc are read. The output is a pure function of those files.
"""

import argparse
import gzip
import os
import re
import sys

# Lemmas megaclip.data.synsets can look up: it splits captions into letter runs and joins up to three
SPELLABLE = re.compile(r"[a-z]+(?:_[a-z]+){0,2}")
LICENSE_LINE = re.compile(r"^  \d+ ?(.*?)\s*$")  # the licence heads each database file as "  N text"


def read_index(path: str) -> dict[str, list[str]]:
    """lemma -> synset offsets in sense order (index.noun: lemma pos synset_cnt p_cnt [ptr]... sense_cnt
    tagsense_cnt offset...)."""
    senses = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            synset_count, pointer_count = int(fields[2]), int(fields[3])
            offsets = fields[6 + pointer_count:]
            if len(offsets) != synset_count:
                raise ValueError(f"{path}: malformed line for '{fields[0]}'")
            senses[fields[0]] = offsets
    return senses


def read_first_lemmas(path: str, offsets: set[str]) -> dict[str, str]:
    """offset -> the synset's first lemma, lower-cased as NLTK names synsets (data.noun: offset lex_filenum
    ss_type w_cnt(hex) word lex_id ...)."""
    first = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            offset = line[:8]
            if offset in offsets:
                first[offset] = line.split(maxsplit=5)[4].lower()
    return first


def read_license(path: str) -> str:
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            match = LICENSE_LINE.match(line)
            if not match:
                break
            lines.append(match.group(1))
    return "\n".join(lines).strip() + "\n"


def noun_table(wordnet_dir: str) -> str:
    senses = read_index(os.path.join(wordnet_dir, "index.noun"))
    lemmas = sorted(lemma for lemma in senses if SPELLABLE.fullmatch(lemma))
    first_lemma = read_first_lemmas(os.path.join(wordnet_dir, "data.noun"), {senses[lemma][0] for lemma in lemmas})
    rows = ["# WordNet 3.0 noun lemma, offset of its first noun synset, that synset's name if not lemma.n.01"]
    for lemma in lemmas:
        offset = senses[lemma][0]
        head = first_lemma[offset]
        name = f"{head}.n.{senses[head].index(offset) + 1:02d}"
        rows.append(f"{lemma}\t{offset}" if name == f"{lemma}.n.01" else f"{lemma}\t{offset}\t{name}")
    return "\n".join(rows) + "\n"


def write_gzip(path: str, text: str) -> None:
    # no name or time in the header: the same input gives the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet", help="holds index.noun, data.noun, noun.exc")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "megaclip", "data"))
    args = parser.parse_args()
    try:
        table = noun_table(args.wordnet_dir)
        with open(os.path.join(args.wordnet_dir, "noun.exc"), encoding="utf-8") as f:
            exceptions = f.read()
        license_text = read_license(os.path.join(args.wordnet_dir, "index.noun"))
    except (OSError, ValueError) as e:
        print(f"build_wordnet_table: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    write_gzip(os.path.join(args.out_dir, "wordnet_nouns.tsv.gz"), table)
    write_gzip(os.path.join(args.out_dir, "wordnet_noun_exc.txt.gz"), exceptions)
    with open(os.path.join(args.out_dir, "WORDNET_LICENSE"), "w", encoding="utf-8") as f:
        f.write(license_text)
    print(f"wrote {table.count(chr(10)) - 1} noun lemmas and {exceptions.count(chr(10))} exceptions to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

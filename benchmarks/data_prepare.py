"""Peak memory and speed of `petra data prepare` on generated corpora of a given size.

    python benchmarks/data_prepare.py --sizes 0.3,1,5 --formats jsonl.zst,parquet --out docs/data_prepare.json

Each corpus is English-like text generated here (Zipf-distributed words from the bundled
Bible's vocabulary plus 1M invented ones, sentences of 6-30 words, documents of 1-10 KB),
written once under --work and reused. Each prepare runs as its own process; its peak RSS is
the kernel's (getrusage of the child), its speed tokens per second of the tokenize pass and
input bytes per second overall. Results are appended to --out as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def vocabulary(rng: np.random.Generator, invented: int = 1_000_000) -> np.ndarray:
    from petra.sources import bible_documents

    words = sorted({w.lower() for d in bible_documents("kjv") for w in re.findall(r"[A-Za-z]+", d.text)})
    syll = np.array(["ka", "lo", "mi", "ster", "an", "tre", "vo", "qu", "el", "ri", "son", "dar", "pe", "ul"])
    made = ["".join(rng.choice(syll, size=rng.integers(2, 5))) for _ in range(invented)]
    vocab = np.array(words + made, dtype=object)
    rng.shuffle(vocab)  # Zipf ranks fall on common and invented words alike
    return vocab


def documents(size_bytes: int, seed: int = 0):
    """Documents of generated text until about size_bytes of UTF-8 have been produced."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(rng)
    made = 0
    while made < size_bytes:
        words = vocab[np.minimum(rng.zipf(1.15, 200_000), len(vocab)) - 1]
        cuts = np.cumsum(rng.integers(6, 31, 20_000))
        cuts = cuts[cuts < len(words)]
        sentences = [" ".join(s) + "." for s in np.split(words, cuts)]
        i = 0
        while i < len(sentences):
            n = int(rng.integers(8, 80))
            text = " ".join(s.capitalize() for s in sentences[i : i + n])
            i += n
            made += len(text) + 1
            yield text
            if made >= size_bytes:
                return


def write_corpus(path: Path, size_bytes: int) -> Path:
    if path.exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(tmp, pa.schema([("text", pa.string())]), compression="zstd") as w:
            batch = []
            for text in documents(size_bytes):
                batch.append(text)
                if len(batch) == 20_000:
                    w.write_table(pa.table({"text": batch}), row_group_size=20_000)
                    batch = []
            if batch:
                w.write_table(pa.table({"text": batch}))
    else:
        import zstandard

        with open(tmp, "wb") as raw:
            f = zstandard.ZstdCompressor(level=3).stream_writer(raw) if path.name.endswith(".zst") else raw
            for text in documents(size_bytes):
                f.write((json.dumps({"text": text}) + "\n").encode())
            f.flush()
            if f is not raw:
                f.close()
    os.replace(tmp, path)
    return path


# the prepare in its own process, which reports its own peak RSS as it ends: VmHWM, the high-water mark
# of its memory map (getrusage's ru_maxrss would also count the parent's RSS copied at fork)
_CHILD = (
    "import sys; from petra.cli import main; rc = main(sys.argv[1:]); "
    "print('PEAK_RSS_KIB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(rc)"
)


def measure(corpus: Path, out: Path, extra: list[str]) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, "data", "prepare", str(corpus), "--out", str(out), *extra],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak = int(proc.stdout.rsplit("PEAK_RSS_KIB ", 1)[1])
    m = json.loads((out / "manifest.json").read_text())
    tokens = m["tokens"]["train"] + m["tokens"]["val"]
    text = sum(m["characters"].values())
    return {
        "corpus": corpus.name,
        "input_bytes": corpus.stat().st_size,
        "characters": text,
        "tokens": tokens,
        "documents": sum(m["documents"].values()),
        "shards": len(m["shards"]),
        "peak_rss_gib": round(peak / 2**20, 3),
        "wall_s": round(wall, 1),
        "tokenize_s": m["tokenize_seconds"],
        "tokens_per_s": round(tokens / m["tokenize_seconds"]),
        "chars_per_s_overall": round(text / wall),
        "tokens_per_s_per_core": round(tokens / m["tokenize_seconds"] / os.cpu_count()),
        "sample_characters": m["tokenizer"]["sample_characters"],
        "log": proc.stdout.strip().splitlines()[:-1],
    }


_PEER = (
    "import sys; sys.path.insert(0, sys.argv[1]); from petra.config import DataConfig; "
    "from petra.data import prepare; "
    "d = prepare(DataConfig(source=sys.argv[2], cache_dir=sys.argv[3]), int(sys.argv[4]), log=print); "
    "print('TOKENS', len(d.train) + len(d.val)); "
    "print('PEAK_RSS_KIB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
)


def measure_peer(src: str, corpus: Path, cache: Path, vocab: str) -> dict:
    """petra's own earlier in-memory pipeline (a checkout of an older commit) on the same corpus."""
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PEER, src, str(corpus), str(cache), vocab], capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak = int(proc.stdout.rsplit("PEAK_RSS_KIB ", 1)[1])
    tokens = int(proc.stdout.rsplit("TOKENS ", 1)[1].split()[0])
    return {
        "corpus": corpus.name,
        "impl": f"in-memory pipeline ({src})",
        "input_bytes": corpus.stat().st_size,
        "tokens": tokens,
        "peak_rss_gib": round(peak / 2**20, 3),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.3,1", help="corpus sizes in GB of text, comma-separated")
    p.add_argument("--formats", default="jsonl.zst", help="comma-separated: jsonl, jsonl.zst, parquet")
    p.add_argument("--work", default="/tmp/petra-data-bench", help="where corpora and outputs are written")
    p.add_argument("--out", default="docs/data_prepare.jsonl", help="results, appended as JSON lines")
    p.add_argument("--vocab-size", default="32000")
    p.add_argument("--sample-mb", default=None, help="passed to petra data prepare (default: its own)")
    p.add_argument(
        "--peer-src",
        default=None,
        help="src/ of a checkout of petra before token shards (e.g. "
        "`git worktree add /tmp/old bdbd760`): its in-memory pipeline runs on each corpus too",
    )
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    extra = ["--vocab-size", args.vocab_size] + (["--sample-mb", args.sample_mb] if args.sample_mb else [])
    for size in args.sizes.split(","):
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            corpus = write_corpus(work / f"gen-{size}GB.{fmt}", int(float(size) * 1e9))
            print(
                f"corpus {corpus.name}: {corpus.stat().st_size / 1e9:.2f} GB on disk ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
            r = measure(corpus, work / f"out-{size}-{fmt}", extra)
            r.update(
                size_gb=float(size),
                format=fmt,
                cpus=os.cpu_count(),
                machine=platform.processor() or platform.machine(),
                date=time.strftime("%Y-%m-%d"),
                args=extra,
            )
            print(json.dumps({k: v for k, v in r.items() if k != "log"}), flush=True)
            rows = [r]
            if args.peer_src:
                peer = measure_peer(args.peer_src, corpus, work / "peer-cache", args.vocab_size)
                peer.update(
                    size_gb=float(size),
                    format=fmt,
                    date=time.strftime("%Y-%m-%d"),
                    rss_ratio=round(peer["peak_rss_gib"] / r["peak_rss_gib"], 2),
                    wall_ratio=round(peer["wall_s"] / r["wall_s"], 2),
                )
                print(json.dumps(peer), flush=True)
                rows.append(peer)
            with open(args.out, "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

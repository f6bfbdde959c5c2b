"""What checking a prepared corpus costs when a run opens it (docs/data.md).

Writes a synthetic prepared directory of --gib GiB of uint16 tokens in shards of 1 GiB (the
manifest's hashes taken while writing, as `petra data prepare` does), then times
`prepare.verify`: cold (no stamps: every shard hashed, as after a copy or a change) and warm
(stamps match: sizes and a stat per file). CPU only; the figure depends on the disk and the
page cache, so both a cold-cache read (after dropping it, where permitted) and a cached one
are reported.

    python benchmarks/verify_cost.py --gib 5 --out /tmp/verify5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from petra.prepare import FORMAT, MANIFEST, STAMPS, file_sha256, verify


def make(out: Path, gib: float, shard_gib: float = 1.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text("{}")
    rng = np.random.default_rng(0)
    shards, left, i = [], int(gib * 2**30), 0
    while left > 0:
        size = min(left, int(shard_gib * 2**30))
        h = hashlib.sha256()
        name = f"shard-{i:05d}.train.bin"
        with (out / name).open("wb") as f:
            for _ in range(0, size, 1 << 26):
                b = rng.integers(0, 32000, min(1 << 25, (size - f.tell()) // 2), dtype=np.uint16).tobytes()
                f.write(b)
                h.update(b)
        (out / name.replace("train", "val")).write_bytes(b"")
        shards.append(
            {
                "train": {"file": name, "tokens": size // 2, "sha256": h.hexdigest()},
                "val": {"file": name.replace("train", "val"), "tokens": 0, "sha256": hashlib.sha256().hexdigest()},
            }
        )
        left -= size
        i += 1
    m = {"format": FORMAT, "dtype": "uint16", "shards": shards}
    m["tokenizer"] = {"file": "tokenizer.json", "sha256": file_sha256(out / "tokenizer.json")}
    (out / MANIFEST).write_text(json.dumps(m))
    return m


def drop_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/verify-cost"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    m = make(args.out, args.gib)
    result = {"gib": args.gib, "files": 2 * len(m["shards"]) + 1}
    for name, dropped in (("cold_disk", drop_cache()), ("cached", False)):
        (args.out / STAMPS).unlink(missing_ok=True)
        t0 = time.perf_counter()
        assert verify(args.out, m) is None
        result[f"hash_all_s_{name}"] = round(time.perf_counter() - t0, 2)
        result[f"{name}_cache_dropped"] = dropped
    t0 = time.perf_counter()
    assert verify(args.out, m) is None
    result["stamped_open_ms"] = round(1000 * (time.perf_counter() - t0), 2)
    print(json.dumps(result))
    shutil.rmtree(args.out)


if __name__ == "__main__":
    main()

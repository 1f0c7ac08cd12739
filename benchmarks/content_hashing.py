"""What checking data by content costs: sha256 throughput, the check's threads, the writer's overhead.

    python benchmarks/content_hashing.py [--gib 1 --threads 1 2 4 8 --json]

Measured on one file of random bytes written to a temporary folder (so reads come from the page
cache: a cold read is bounded by the disk instead, which this does not measure):

- read:       reading the file in 16 MiB blocks, no hashing (the baseline);
- sha256:     hashlib.sha256 over the same bytes in memory, one thread;
- check xN:   data/verify.py's full check (platform/checksums.BlockCheck) on N threads;
- writer:     megamft-preprocess's IndexedWriter (write + block checksums as it writes) against a
              plain write of the same bytes.

Every figure is printed with its ratio to the baseline measured in the same run, and the time a
full check would take for a 100 GB corpus at the measured rate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from megamft.data.indexed import IndexedWriter
from megamft.platform.checksums import BLOCK_BYTES, BlockCheck, all_blocks, file_record


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _read(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(BLOCK_BYTES):
            pass


def _sha256(data: bytes) -> None:
    hashlib.sha256(data).hexdigest()


def _writer(folder: Path, tokens: np.ndarray) -> None:
    writer = IndexedWriter(folder / "w", np.uint16)
    for chunk in np.array_split(
        tokens, max(1, len(tokens) // 2**20)
    ):  # ~1M tokens per add, as chunks arrive
        writer.add(chunk, np.array([len(chunk)]))
    writer.finish()
    writer.discard()


def _plain(folder: Path, tokens: np.ndarray) -> None:
    with open(folder / "plain", "wb") as f:
        for chunk in np.array_split(tokens, max(1, len(tokens) // 2**20)):
            f.write(chunk.tobytes())
    (folder / "plain").unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test file")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = int(args.gib * 2**30)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="megamft-hashing-") as scratch:
        folder = Path(scratch)
        path = folder / "data.bin"
        data = os.urandom(size)
        path.write_bytes(data)
        _read(path)  # warm the page cache
        baseline = min(_timed(lambda: _read(path)) for _ in range(2))
        rows["read"] = baseline
        rows["sha256 (1 thread, in memory)"] = min(_timed(lambda: _sha256(data)) for _ in range(2))
        record = file_record(path)
        for threads in args.threads:
            rows[f"check x{threads}"] = _timed(
                lambda n=threads: BlockCheck(all_blocks(path, record), n).start().wait()
            )
        tokens = np.frombuffer(data, dtype=np.uint16)
        plain = min(_timed(lambda: _plain(folder, tokens)) for _ in range(2))
        rows["plain write"] = plain
        rows["writer (write + checksums)"] = min(
            _timed(lambda: _writer(folder, tokens)) for _ in range(2)
        )
    gb = size / 1e9
    result = {
        name: {
            "seconds": round(t, 3),
            "GB/s": round(gb / t, 3),
            "ratio to read": round(t / baseline, 2),
            "100 GB corpus, s": round(100 / (gb / t), 1),
        }
        for name, t in rows.items()
    }
    result["writer (write + checksums)"]["ratio to plain write"] = round(
        rows["writer (write + checksums)"] / plain, 2
    )
    result["cpu cores"] = len(os.sched_getaffinity(0))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.gib:g} GiB from the page cache, {result['cpu cores']} cores")
    for name, row in result.items():
        if isinstance(row, dict):
            extra = (
                f"  ({row['ratio to plain write']}x a plain write)"
                if "ratio to plain write" in row
                else ""
            )
            print(
                f"  {name:<30} {row['GB/s']:>7.2f} GB/s  {row['ratio to read']:>6.2f}x read  "
                f"100 GB: {row['100 GB corpus, s']:>7.1f} s{extra}"
            )


if __name__ == "__main__":
    main()

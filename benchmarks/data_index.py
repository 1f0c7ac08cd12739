"""Training index benchmark: build time and resident memory per rank against megatron-core's GPTDataset index.

    python benchmarks/data_index.py [--documents 1e6 1e7] [--seq-length 2048] [--modes pack concat pad]
                                    [--work DIR] [--train-run]

For each corpus size, one synthetic preprocessed folder (three tasks holding 60/30/10% of the documents;
lengths log-normal, median 148 tokens, 2 to 8192; the .bin files sparse, the .idx files real) is indexed,
in the same run, by
  * megatron-core: BlendedMegatronDatasetBuilder over GPTDataset (its compiled helpers_cpp: the sample
    index, the blending indices), the three tasks blended by their token counts, one epoch's samples;
  * megamft: load_data with a fresh index cache (the split, coverage, validation rows and data epoch 0,
    written; then data epoch 1, which training prepares in the background), for each data.mode;
each in a fresh process, as the rank that builds (cache empty), then as a rank that reads (cache present).
Resident memory is the process's private memory (RssAnon) above what it held before the measured part:
what each rank pays beyond the shared memory maps of the data and the cache (RssFile, reported apart).
Ratios are megamft over megatron-core, measured in the same run (this machine is shared and noisy).
--train-run: a 2-step `megamft train` on the largest folder and on a 605-document one, wall time each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TASKS = (("code", 0.6), ("text", 0.3), ("tests", 0.1))
VOCAB = 32000
HERE = Path(__file__).resolve()


# ---------------------------------------------------------------- the synthetic folder


def _write_idx(path: Path, lengths: np.ndarray, dtype_code: int, itemsize: int) -> None:
    """A megatron .idx for one sequence per document (megamft.data.indexed's layout)."""
    import struct

    n = len(lengths)
    with open(path, "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, dtype_code, n, n + 1))
        f.write(lengths.astype(np.int32).tobytes())
        pointers = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
        f.write(pointers.tobytes())
        del pointers
        for start in range(0, n + 1, 1 << 24):
            f.write(np.arange(start, min(start + (1 << 24), n + 1), dtype=np.int64).tobytes())


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def make_folder(folder: Path, documents: int, seed: int = 0) -> dict:
    """megamft-preprocess's layout (tokens, loss mask, task ids, manifest.json) of synthetic lengths. The
    manifest counts every token of `code` learned (raw code) and half of the others' (prompts and answers),
    so the start-up count of cut samples reads the loss masks of those two, as it would for real data."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for task, (name, share) in enumerate(TASKS):
        n = int(documents * share)
        lengths = np.clip(rng.lognormal(5.0, 1.0, n), 2, 8192).astype(np.int32)
        tokens = int(lengths.sum(dtype=np.int64))
        _write_idx(folder / f"{name}.idx", lengths, 8, 2)  # uint16 tokens
        _sparse(folder / f"{name}.bin", tokens * 2)
        _write_idx(folder / f"{name}_loss_mask.idx", lengths, 1, 1)  # uint8 mask
        _sparse(folder / f"{name}_loss_mask.bin", tokens)
        _write_idx(folder / f"{name}_task_id.idx", np.ones(n, dtype=np.int32), 8, 2)
        _sparse(folder / f"{name}_task_id.bin", n * 2)
        entries.append(
            {
                "name": name,
                "id": task,
                "documents": n,
                "tokens": tokens,
                "learned_tokens": tokens if name == "code" else tokens // 2,
                "truncated": 0,
                "dropped": {},
                "max_token_id": VOCAB - 1,
                "prefix": name,
                "loss_mask_prefix": f"{name}_loss_mask",
                "task_id_prefix": f"{name}_task_id",
            }
        )
    manifest = {
        "format": "megamft-indexed/1",
        "tokenizer": {"vocab_size": VOCAB, "max_token_id": VOCAB - 1, "pad_id": 0},
        "template": None,
        "token_dtype": "uint16",
        "options": {},
        "tasks": entries,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


# ---------------------------------------------------------------- measuring one process


class Memory:
    """Peaks of this process's private (RssAnon) and file-backed (RssFile) resident memory, sampled every 5 ms."""

    def __init__(self):
        self.base = self._read()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _read() -> dict:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1024  # MiB
        return values

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            for key, value in self._read().items():
                self.peak[key] = max(self.peak[key], value)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        now = self._read()
        return {
            "peak_anon_mb": self.peak["RssAnon"] - self.base["RssAnon"],
            "end_anon_mb": now["RssAnon"] - self.base["RssAnon"],
            "file_mb": now["RssFile"],
        }


def measure_megatron(folder: Path, cache: Path, seq_length: int) -> dict:
    """BlendedMegatronDatasetBuilder over GPTDataset: megatron-core's index (built, or loaded from `cache`)."""
    import logging

    logging.disable(logging.INFO)
    import torch

    from megamft.platform.distributed import free_port

    # BlendedDataset asks for the rank: a group of one process, as a single-GPU run has.
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    manifest = json.loads((folder / "manifest.json").read_text())
    tokens = [t["tokens"] for t in manifest["tasks"]]
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq_length,
        blend=([str(folder / t["prefix"]) for t in manifest["tasks"]], [float(n) for n in tokens]),
        split="100,0,0",
        path_to_cache=str(cache),
        tokenizer=NullTokenizer(VOCAB),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    samples = sum(tokens) // seq_length  # one epoch of every task's tokens
    memory = Memory()
    start = time.perf_counter()
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [samples, 0, 0], lambda: True, config
    ).build()
    seconds = time.perf_counter() - start
    for i in range(0, len(train), max(len(train) // 1000, 1)):  # a thousand samples' index entries
        train.dataset_index[i], train.dataset_sample_index[i]
    return {"seconds": seconds, "sequences": len(train), **memory.stop()}


def measure_megamft(folder: Path, cache: Path, mode: str, seq_length: int, builder: bool) -> dict:
    """load_data as a building rank (plan and epoch 0; then epoch 1) or as a reading rank."""
    from megamft.config import load_config
    from megamft.data import dataset
    from megamft.data.train_index import IndexSharing

    cfg = load_config(
        None,
        [
            "data.source=indexed",
            f"data.path={folder}",
            f"data.index_cache={cache}",
            f"data.mode={mode}",
            f"data.seq_length={seq_length}",
        ],
    ).data
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: F401 (imported before timing)

    opened = time.perf_counter()
    dataset._indexed_source(
        cfg
    )  # the data files checked and mapped: what every rank does, index or not
    open_seconds = time.perf_counter() - opened
    memory = Memory()
    start = time.perf_counter()
    data = dataset.load_data(cfg, IndexSharing(builder=builder, poll_s=0.01))
    seconds = time.perf_counter() - start
    rows = data.train.sequences_per_epoch()
    for p in range(0, rows, max(rows // 1000, 1)):  # a thousand sequences read through the index
        data.train.row(p)
    data.train._ahead.result()  # the next epoch, prepared beside training
    next_seconds = (
        time.perf_counter() - start - seconds
    )  # from the first step's rows to the next epoch's
    result = memory.stop()
    return {
        "seconds": seconds,
        "open_seconds": open_seconds,
        "next_epoch_wait_s": next_seconds,
        "sequences": rows,
        **result,
    }


def run_measure(args) -> None:
    folder, cache = Path(args.folder), Path(args.cache)
    if args.measure == "megatron":
        out = measure_megatron(folder, cache, args.seq_length)
    else:
        out = measure_megamft(
            folder, cache, args.mode, args.seq_length, args.measure == "megamft-build"
        )
    print("RESULT " + json.dumps(out), flush=True)


def _child(kind: str, folder: Path, cache: Path, seq_length: int, mode: str = "pack") -> dict:
    command = [
        sys.executable,
        str(HERE),
        "--measure",
        kind,
        "--folder",
        str(folder),
        "--cache",
        str(cache),
        "--seq-length",
        str(seq_length),
        "--mode",
        mode,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------- the table


def bench_size(work: Path, documents: int, seq_length: int, modes: list[str]) -> list[str]:
    folder = work / f"docs-{documents}"
    started = time.perf_counter()
    manifest = make_folder(folder, documents)
    made = time.perf_counter() - started
    tokens = sum(t["tokens"] for t in manifest["tasks"])
    lines = [
        f"\n{documents:,} documents ({tokens / 1e9:.2f}B tokens, folder written in {made:.0f} s), "
        f"seq_length {seq_length}:",
        f"  {'index':<34} {'build s':>8} {'x mcore':>8} {'peak MiB':>9} {'x mcore':>8} {'reader MiB':>10} "
        f"{'x mcore':>8} {'sequences':>11}",
    ]
    cache = work / f"cache-{documents}"
    shutil.rmtree(cache, ignore_errors=True)
    built = _child("megatron", folder, cache / "megatron", seq_length)
    read = _child("megatron", folder, cache / "megatron", seq_length)
    lines.append(
        f"  {'megatron-core GPTDataset (blended)':<34} {built['seconds']:8.2f} {'1.00':>8} "
        f"{built['peak_anon_mb']:9.0f} {'1.00':>8} {read['end_anon_mb']:10.1f} {'1.00':>8} "
        f"{built['sequences']:11,}"
    )
    for mode in modes:
        mine = _child("megamft-build", folder, cache / mode, seq_length, mode)
        reader = _child("megamft-read", folder, cache / mode, seq_length, mode)
        lines.append(
            f"  {'megamft data.mode=' + mode:<34} {mine['seconds']:8.2f} "
            f"{mine['seconds'] / built['seconds']:8.2f} {mine['peak_anon_mb']:9.0f} "
            f"{mine['peak_anon_mb'] / max(built['peak_anon_mb'], 1):8.2f} {reader['end_anon_mb']:10.1f} "
            f"{reader['end_anon_mb'] / max(read['end_anon_mb'], 1):8.2f} {mine['sequences']:11,}"
        )
        lines.append(
            f"  {'':<34} next epoch ready {mine['next_epoch_wait_s']:.2f} s after the first; reader "
            f"start {reader['seconds']:.2f} s, peak {reader['peak_anon_mb']:.0f} MiB; data files "
            f"checked and opened in {mine['open_seconds']:.2f} s"
        )
    shutil.rmtree(cache, ignore_errors=True)
    return lines


def train_run(work: Path, big: Path, repeats: int = 3) -> list[str]:
    """Wall time of a 2-step `megamft train` on the big folder and on a 605-document one, each run
    `repeats` times in turn (a fresh index cache every time); the fastest of each, as the least disturbed by
    other jobs on the machine."""
    small = work / "docs-605"
    make_folder(small, 605)
    names = {"605 documents": small, big.name.replace("docs-", "") + " documents": big}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, folder in names.items():
            cache = work / "train-cache" / folder.name
            shutil.rmtree(cache, ignore_errors=True)
            times[name].append(_train_seconds(folder, cache))
    (small_s, big_s) = (min(t) for t in times.values())
    return [
        f"\n2-step megamft train (examples/quickstart.yaml, TP=1, a fresh index cache), fastest of "
        f"{repeats}: "
        + ", ".join(
            f"{k} {min(v):.1f} s (all: {', '.join(f'{x:.1f}' for x in v)})"
            for k, v in times.items()
        )
        + f"; {big_s - small_s:+.1f} s"
    ]


def _train_seconds(folder: Path, cache: Path) -> float:
    command = [
        sys.executable,
        "-m",
        "megamft",
        "train",
        "--config",
        str(HERE.parent.parent / "examples" / "quickstart.yaml"),
        "parallel.tensor_model_parallel_size=1",
        "data.source=indexed",
        f"data.path={folder}",
        "data.max_samples_per_task=null",
        "train.train_steps=2",
        "train.lr_warmup_steps=0",
        f"data.index_cache={cache}",
        "checkpoint.save_dir=null",
        "data.valid_samples_per_task=4",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training on {folder} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", nargs="+", type=float, default=[1e6, 1e7])
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--modes", nargs="+", default=["pack", "concat", "pad"])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--train-run", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="pack", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        run_measure(args)
        return 0
    from megamft.data import index_kernels

    print(
        f"index kernels: {'compiled C' if index_kernels.compiled() else 'Python (no C compiler)'}; "
        f"{os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        for documents in args.documents:
            print(
                "\n".join(bench_size(work, int(documents), args.seq_length, args.modes)), flush=True
            )
        if args.train_run:
            print("\n".join(train_run(work, work / f"docs-{int(args.documents[-1])}")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

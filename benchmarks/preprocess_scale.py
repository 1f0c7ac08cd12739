"""Preprocessing at scale: throughput at 1 and 2 workers and memory that does not grow with the corpus.

    python benchmarks/preprocess_scale.py [--megabytes 2048] [--work DIR] [--keep]

Makes a synthetic corpus for continued pretraining (JSON lines of {"text": <source file>}: slices of the
Python standard library's own .py files, lengths log-normal with a median of about 3 KB and a tail past
100 KB, each record made unique by a header line) of `--megabytes`, trains a byte-level BPE tokenizer
(8,000 ids) on its first 16 MB, and runs megamft-preprocess on it as a user would (`--max-seq-length 4097
--overlong split --template chatml`, a fresh process each run) in one run:
  * the whole corpus with 1 and then 2 workers: MB/s and tokens/s, and their ratio;
  * an eighth of the corpus with 2 workers: peak resident memory (the main process, and the whole tree with
    its workers, sampled every 20 ms) against the whole corpus's, which stays the same when memory is
    constant (chunks are read, encoded and written as they go; nothing grows with the corpus but the
    dedup set of 12-byte digests, one per record).
The two output folders of the whole corpus are compared byte for byte (the same at any --workers).
No Megatron-LM runner ships with megamft (its tools/preprocess_data.py is not installed here), so there is
no baseline of another tool in this run; the ratios are megamft's against itself.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _sources() -> list[str]:
    """The text of every .py file of the standard library (real code, about 30 MB)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    """JSON lines of {"text": ...} up to `megabytes`; returns the number of records."""
    rng = np.random.default_rng(seed)
    blob = "\n".join(_sources())
    target, written, records = megabytes * 2**20, 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            lines = []
            for size, start in zip(
                np.clip(rng.lognormal(8.0, 1.2, 64), 200, 400_000).astype(int),
                rng.integers(0, len(blob), 64),
            ):
                text = f"# synthetic file {records}\n" + blob[start : start + size]
                lines.append(json.dumps({"text": text}) + "\n")
                records += 1
            chunk = "".join(lines)
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return records


def make_tokenizer(corpus: Path, folder: Path) -> Path:
    """A byte-level BPE tokenizer.json (8,000 ids, <|endoftext|> its EOS) trained on the corpus's first 16 MB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        read = 0
        with corpus.open(encoding="utf-8") as f:
            for line in f:
                read += len(line)
                if read > 16 * 2**20:
                    return
                yield json.loads(line)["text"]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None})
    )
    return folder / "tokenizer.json"


class TreeMemory:
    """Peak resident memory of a process (main) and of it with its children (tree), sampled every 20 ms."""

    def __init__(self, pid: int):
        import psutil

        self._process = psutil.Process(pid)
        self.main_mb = self.tree_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.02):
            try:
                main = self._process.memory_info().rss
                tree = main + sum(
                    c.memory_info().rss for c in self._process.children(recursive=True)
                )
            except psutil.Error:
                continue
            self.main_mb, self.tree_mb = (
                max(self.main_mb, main / 2**20),
                max(self.tree_mb, tree / 2**20),
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_preprocess(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    command = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--task",
        f"code={corpus}",
        "--tokenizer",
        str(tokenizer),
        "--template",
        "chatml",
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--max-seq-length",
        "4097",
        "--overlong",
        "split",
        "--quiet",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"megamft-preprocess failed:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    task = json.loads((out / "manifest.json").read_text())["tasks"][0]
    return {
        "seconds": seconds,
        "tokens": task["tokens"],
        "documents": task["documents"],
        "split": task["split"],
        "pieces": task["pieces"],
        "main_mb": memory.main_mb,
        "tree_mb": memory.tree_mb,
    }


def _same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".bin", ".idx"))
    return bool(names) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megabytes", type=int, default=2048, help="size of the synthetic corpus")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        started = time.perf_counter()
        records = make_corpus(work / "corpus.jsonl", args.megabytes)
        eighth = make_corpus(work / "eighth.jsonl", max(args.megabytes // 8, 1))
        tokenizer = make_tokenizer(work / "corpus.jsonl", work / "tokenizer")
        print(
            f"corpus: {args.megabytes:,} MB, {records:,} records (and an eighth: {eighth:,} records), "
            f"written with its tokenizer in {time.perf_counter() - started:.0f} s"
        )
        runs = {
            w: run_preprocess(work / "corpus.jsonl", tokenizer, work / f"out{w}", w) for w in (1, 2)
        }
        small = run_preprocess(work / "eighth.jsonl", tokenizer, work / "out-eighth", 2)
        size = {
            name: (work / f"{name}.jsonl").stat().st_size / 2**20 for name in ("corpus", "eighth")
        }
        print(
            f"megamft-preprocess --max-seq-length 4097 --overlong split: {runs[1]['documents']:,} documents "
            f"({runs[1]['split']:,} records split into {runs[1]['pieces']:,} pieces), "
            f"{runs[1]['tokens'] / 1e6:,.1f}M tokens"
        )
        print(
            f"  {'run':<28} {'seconds':>8} {'MB/s':>7} {'Mtokens/s':>10} {'x 1 worker':>10} {'main MiB':>9} "
            f"{'tree MiB':>9}"
        )
        for name, run, mb in (
            ("corpus, 1 worker", runs[1], size["corpus"]),
            ("corpus, 2 workers", runs[2], size["corpus"]),
            ("eighth of it, 2 workers", small, size["eighth"]),
        ):
            print(
                f"  {name:<28} {run['seconds']:8.1f} {mb / run['seconds']:7.2f} "
                f"{run['tokens'] / run['seconds'] / 1e6:10.3f} "
                f"{(run['tokens'] / run['seconds']) / (runs[1]['tokens'] / runs[1]['seconds']):10.2f} "
                f"{run['main_mb']:9.0f} {run['tree_mb']:9.0f}"
            )
        print(
            f"peak memory, whole corpus over an eighth of it (2 workers): main "
            f"{runs[2]['main_mb'] / small['main_mb']:.2f}x, tree {runs[2]['tree_mb'] / small['tree_mb']:.2f}x "
            f"for 8x the input; outputs at 1 and 2 workers byte-identical: "
            f"{_same_output(work / 'out1', work / 'out2')}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Preprocessing at scale: throughput at 1 and 2 workers and memory that does not grow with the corpus.

    python benchmarks/preprocess_scale.py [--megabytes 2048] [--work DIR] [--workers 1 2]
                                          [--megatron-lm CHECKOUT [--megatron-lm-path DIRS]]
                                          [--repeats N]

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
The output folders of the whole corpus are compared byte for byte (the same at any --workers).

--megatron-lm CHECKOUT: also runs Megatron-LM's own tools/preprocess_data.py from that checkout (a clone at
the tag matching the installed megatron-core, e.g. core_v0.16.1) on the same corpus with the same tokenizer
(`--tokenizer-type HuggingFaceTokenizer --json-keys text --append-eod`) at the largest --workers, and prints
megamft's throughput over it. Its script imports megatron.training, which needs `six` and `triton` (importable
without a GPU): give their install folder with --megatron-lm-path (e.g. `pip install --target DIR six triton`).
--repeats N runs every measurement N times in turn and reports the fastest (this machine is shared).
Megatron-LM's run does less than megamft's (no template, no loss masks or task ids, no splitting of long records).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
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


def _timed(command: list[str], what: str, env: dict | None = None) -> tuple[float, TreeMemory]:
    """Wall time and peak memory of a command run to its end (RuntimeError with its output if it fails)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    memory = TreeMemory(process.pid)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return seconds, memory


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
    seconds, memory = _timed(command, "megamft-preprocess")
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


def run_megatron_lm(
    checkout: Path, extra_path: str, corpus: Path, tokenizer: Path, out: Path, workers: int
) -> dict:
    """Megatron-LM's tools/preprocess_data.py on the corpus, as its README runs it for GPT data."""
    import os

    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(checkout / "tools" / "preprocess_data.py"),
        "--input",
        str(corpus),
        "--json-keys",
        "text",
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(tokenizer.parent),
        "--append-eod",
        "--workers",
        str(workers),
        "--output-prefix",
        str(out / "corpus"),
        "--log-interval",
        "100000",
    ]
    paths = [str(checkout), *filter(None, extra_path.split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    seconds, memory = _timed(command, "Megatron-LM's preprocess_data.py", env)
    tokens = _megatron_tokens(out / "corpus_text_document")  # by megatron-core's own reader
    return {
        "seconds": seconds,
        "tokens": tokens,
        "main_mb": memory.main_mb,
        "tree_mb": memory.tree_mb,
    }


def _megatron_tokens(prefix: Path) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix), mmap=True)
    return int(dataset.sequence_lengths.sum(dtype=np.int64))  # while the dataset holds its map


def _fastest(runs: list[dict]) -> dict:
    """The fastest of repeated runs (the least disturbed by other jobs), with the peak memory of all."""
    best = dict(min(runs, key=lambda run: run["seconds"]))
    for key in ("main_mb", "tree_mb"):
        best[key] = max(run[key] for run in runs)
    return best


def _same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".bin", ".idx"))
    return bool(names) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megabytes", type=int, default=2048, help="size of the synthetic corpus")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="megamft-preprocess --workers to run"
    )
    parser.add_argument("--megatron-lm", type=Path, help="a Megatron-LM checkout to compare with")
    parser.add_argument(
        "--megatron-lm-path", default="", help="folders its imports need (six, triton), os.pathsep"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each, in turn; the fastest is reported"
    )
    args = parser.parse_args(argv)
    workers = sorted(set(args.workers))
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
        most = workers[-1]
        measured = {f"megamft {w}": (run_preprocess, "corpus", f"out{w}", w) for w in workers}
        measured["eighth"] = (run_preprocess, "eighth", "out-eighth", most)
        if args.megatron_lm:
            checkout, path = args.megatron_lm.resolve(), args.megatron_lm_path
            measured["Megatron-LM"] = (
                lambda *a: run_megatron_lm(checkout, path, *a),
                "corpus",
                "out-megatron-lm",
                most,
            )
        results: dict[str, list[dict]] = {name: [] for name in measured}
        for _ in range(args.repeats):  # in turn, so that another job's load falls on all of them
            for name, (run, corpus, out, w) in measured.items():
                shutil.rmtree(work / out, ignore_errors=True)
                results[name].append(run(work / f"{corpus}.jsonl", tokenizer, work / out, w))
        best = {name: _fastest(done) for name, done in results.items()}
        runs = {w: best[f"megamft {w}"] for w in workers}
        small, megatron_lm = best["eighth"], best.get("Megatron-LM")
        size = {
            name: (work / f"{name}.jsonl").stat().st_size / 2**20 for name in ("corpus", "eighth")
        }
        first = runs[workers[0]]
        print(
            f"megamft-preprocess --max-seq-length 4097 --overlong split: {first['documents']:,} documents "
            f"({first['split']:,} records split into {first['pieces']:,} pieces), "
            f"{first['tokens'] / 1e6:,.1f}M tokens"
        )
        rows = [(f"corpus, {w} worker{'s' * (w > 1)}", runs[w], size["corpus"]) for w in workers]
        rows.append((f"eighth of it, {most} workers", small, size["eighth"]))
        if megatron_lm:
            rows.append((f"Megatron-LM, {most} workers", megatron_lm, size["corpus"]))
        print(
            f"  {'run':<28} {'seconds':>8} {'MB/s':>7} {'Mtokens/s':>10} {'x first':>8} {'main MiB':>9} "
            f"{'tree MiB':>9}"
        )
        for name, run, mb in rows:
            print(
                f"  {name:<28} {run['seconds']:8.1f} {mb / run['seconds']:7.2f} "
                f"{run['tokens'] / run['seconds'] / 1e6:10.3f} "
                f"{first['seconds'] / run['seconds'] * (mb / size['corpus']):8.2f} "
                f"{run['main_mb']:9.0f} {run['tree_mb']:9.0f}"
            )
        print(
            f"peak memory, whole corpus over an eighth of it ({most} workers): main "
            f"{runs[most]['main_mb'] / small['main_mb']:.2f}x, tree "
            f"{runs[most]['tree_mb'] / small['tree_mb']:.2f}x for 8x the input"
            + (
                f"; outputs at {workers} workers byte-identical: "
                + str(
                    all(_same_output(work / f"out{workers[0]}", work / f"out{w}") for w in workers)
                )
                if len(workers) > 1
                else ""
            )
        )
        if megatron_lm:
            print(
                f"megamft over Megatron-LM's preprocess_data.py at {most} workers, same corpus and "
                f"tokenizer: {megatron_lm['seconds'] / runs[most]['seconds']:.2f}x the MB/s "
                f"(its run: --append-eod, no template or masks; {megatron_lm['tokens'] / 1e6:,.1f}M tokens)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

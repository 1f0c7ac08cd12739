"""Data pipeline benchmark: preprocessing throughput and the padding of each sequence mode.

    python benchmarks/data_pipeline.py [--work DIR] [--copies 2]

On the same input, in one run (these machines are noisy, so only ratios
measured together mean anything):
  * tokens/s of megamft-preprocess with 1 and 2 workers (templates, masks,
    three indexed datasets per task, manifest), of a naive loop (json.loads,
    one encode per sample, tokens written), and of the tokenizer's own batch
    encoding of the same texts with no I/O: the practical limit;
  * the fraction of non-padding positions of modes pad, dynamic, pack and
    concat at sequence lengths 2048 and 4096, with first-fit-decreasing over
    the whole corpus as the reference, and how well packing keeps the random
    input order (rank correlation of each sample's input and output position).
Inputs: the embedded corpus (stdlib functions, three tasks) with a sentencepiece
tokenizer trained on it, and a larger corpus of `--copies` variants of it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

# Light imports only at module level: preprocessing workers are spawned and
# re-import this file, and torch (behind the training-time modules) would
# cost each of them seconds of start-up.
from megamft.data.preprocess import PreprocessOptions, preprocess
from megamft.data.stdlib_corpus import build_corpus
from megamft.data.tokenizer import load_tokenizer
from megamft.data.train_tokenizer import train_sentencepiece

ROLES = {"human": "<s>human\n", "bot": "<s>bot\n", "system": "<s>system\n"}


def write_corpus(folder: Path, copies: int) -> dict[str, list[str]]:
    """Per task, a JSONL file; copy k > 0 varies every prompt so no line repeats."""
    corpus = build_corpus(max_chars=16_000, samples_per_task=10**9, seed=1234)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for task, samples in corpus.items():
        path = folder / f"{task}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for k in range(copies):
                for turns in samples:
                    varied = [
                        dict(
                            t,
                            content=(f"[variant {k}] " if k and t["role"] == "human" else "")
                            + t["content"],
                        )
                        for t in turns
                    ]
                    f.write(json.dumps({"chat_rounds": varied}) + "\n")
        tasks[task] = [str(path)]
    return tasks


def _texts(tasks: dict[str, list[str]]) -> list[list[dict]]:
    return [
        json.loads(line)["chat_rounds"]
        for paths in tasks.values()
        for p in paths
        for line in open(p)
    ]


def naive_loop(tasks: dict[str, list[str]], tokenizer_path: str, out: Path) -> int:
    """json.loads and one encode of the rendered sample per line; tokens appended to one file."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    written = 0
    with open(out, "wb") as f:
        for paths in tasks.values():
            for path in paths:
                for line in open(path, encoding="utf-8"):
                    turns = json.loads(line)["chat_rounds"]
                    text = "".join(ROLES[t["role"]] + t["content"] + "\n" for t in turns)
                    ids = np.asarray(sp.encode(text), dtype=np.uint16)
                    f.write(ids.tobytes())
                    written += len(ids)
    return written


def throughput(tasks, tokenizer_path: str, work: Path) -> dict[str, float]:
    rates = {}
    for workers in (1, 2):
        start = time.perf_counter()
        manifest = preprocess(
            PreprocessOptions(
                tasks=tasks,
                out_dir=str(work / f"out{workers}"),
                tokenizer=tokenizer_path,
                workers=workers,
                progress=False,
                dedup=False,
            )
        )
        seconds = time.perf_counter() - start
        tokens = sum(t["tokens"] for t in manifest["tasks"])
        rates[f"megamft-preprocess, {workers} worker(s)"] = tokens / seconds
    start = time.perf_counter()
    tokens = naive_loop(tasks, tokenizer_path, work / "naive.bin")
    rates["naive loop (json.loads + encode per sample)"] = tokens / (time.perf_counter() - start)
    texts = [t["content"] for turns in _texts(tasks) for t in turns]
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    start = time.perf_counter()
    encoded = sp.encode(texts)  # all cores, no I/O
    rates["tokenizer batch encode (limit)"] = sum(map(len, encoded)) / (time.perf_counter() - start)
    return rates


def padding_table(folder: Path, micro_batch_size: int = 4) -> list[str]:
    from megamft.data.dataset import IndexedDocuments
    from megamft.data.sequences import batch_length, build_rows, positions_of

    manifest = json.loads((folder / "manifest.json").read_text())
    stores = [IndexedDocuments(folder, e) for e in manifest["tasks"]]
    tasks = np.concatenate([np.full(len(s.lengths), i) for i, s in enumerate(stores)])
    docs = np.concatenate([np.arange(len(s.lengths)) for s in stores])
    order = np.random.default_rng(0).permutation(len(tasks))
    tasks, docs = tasks[order], docs[order]
    lengths = np.array([stores[t].lengths[d] for t, d in zip(tasks, docs)])
    lines = []
    for seq in (2048, 4096):
        useful = int(positions_of(lengths, seq).sum())
        fractions = {}
        for mode in ("pad", "concat", "pack"):
            rows = build_rows(tasks, docs, lengths, mode, seq, window=1000, seed=0)
            fractions[mode] = useful / (len(rows) * seq)
            if mode == "pack":
                input_position = {
                    (t, d): i for i, (t, d) in enumerate(zip(tasks.tolist(), docs.tolist()))
                }
                packed_order = [
                    input_position[(int(t), int(d))] for t, d in zip(rows.tasks, rows.docs)
                ]
                correlation = np.corrcoef(
                    np.argsort(np.argsort(packed_order)), np.arange(len(packed_order))
                )[0, 1]
        pad_rows = build_rows(tasks, docs, lengths, "pad", seq, window=1, seed=0)
        dynamic = sum(
            batch_length(
                [pad_rows.row(r) for r in range(s, min(s + micro_batch_size, len(pad_rows)))],
                stores,
                seq,
                8,
            )
            * len(range(s, min(s + micro_batch_size, len(pad_rows))))
            for s in range(0, len(pad_rows), micro_batch_size)
        )
        fractions["dynamic"] = useful / dynamic
        ffd = build_rows(tasks, docs, lengths, "pack", seq, window=len(docs), seed=0)
        fractions["first-fit-decreasing, whole corpus"] = useful / (len(ffd) * seq)
        lines.append(
            f"  seq {seq}: "
            + " | ".join(f"{k} {v:.2%}" for k, v in fractions.items())
            + f" | pack order rank-correlation with input {correlation:.3f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--copies", type=int, default=2, help="variants of the corpus in the larger input"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        small = write_corpus(work / "embedded", copies=1)
        tokenizer = str(
            train_sentencepiece(
                [Path(p[0]) for p in small.values()], work / "tokenizer.model", 8000
            )
        )
        print(
            f"tokenizer: sentencepiece BPE, {load_tokenizer(tokenizer).vocab_size} pieces, trained on the embedded corpus"
        )
        for name, tasks in (
            ("embedded corpus", small),
            (
                f"larger corpus ({args.copies} variants)",
                write_corpus(work / "larger", copies=args.copies),
            ),
        ):
            rates = throughput(tasks, tokenizer, work / name.split()[0])
            manifest = json.loads((work / name.split()[0] / "out1" / "manifest.json").read_text())
            tokens = sum(t["tokens"] for t in manifest["tasks"])
            samples = sum(t["documents"] for t in manifest["tasks"])
            limit = rates["tokenizer batch encode (limit)"]
            print(f"\n{name}: {samples} samples, {tokens / 1e6:.2f}M tokens")
            for label, rate in rates.items():
                print(
                    f"  {label:<45} {rate / 1e6:6.2f}M tokens/s  {rate / limit:6.1%} of batch encode"
                )
            print("non-padding fraction of each mode (micro-batch 4 for dynamic):")
            print("\n".join(padding_table(work / name.split()[0] / "out1")))
    return 0


if __name__ == "__main__":  # preprocessing workers are spawned: they re-import this file
    raise SystemExit(main())

"""Write the embedded multitask corpus as MFTCoder-style JSON Lines, one file per task.

    python tools/export_stdlib_corpus.py --out data/stdlib --max-chars 2000 --samples-per-task 5000

Each line is {"chat_rounds": [{"role": "human", ...}, {"role": "bot", ...}]}.
Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from megamft.data.stdlib_corpus import build_corpus
from megamft.entry_point import ArgumentParser, run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("export_stdlib_corpus", lambda: _export(argv))


def _export(argv: list[str] | None) -> int:
    parser = ArgumentParser(
        prog="export_stdlib_corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--max-chars", type=int, default=2000, help="longest sample, in characters")
    parser.add_argument("--samples-per-task", type=int, default=5000)
    parser.add_argument(
        "--seed", type=int, default=1234, help="order in which stdlib files are read"
    )
    args = parser.parse_args(argv)
    corpus = build_corpus(args.max_chars, args.samples_per_task, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for task, samples in corpus.items():
        final = args.out / f"{task}.jsonl"
        partial = final.with_name(final.name + ".partial")
        with partial.open("w", encoding="utf-8") as handle:
            for turns in samples:
                handle.write(json.dumps({"chat_rounds": turns}, ensure_ascii=False) + "\n")
        os.replace(partial, final)
        print(f"{final}: {len(samples)} samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

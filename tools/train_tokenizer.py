"""Train a sentencepiece BPE tokenizer on conversation JSON Lines.

python tools/train_tokenizer.py --input data/stdlib --out data/stdlib/tokenizer.model --vocab-size 8000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megamft.entry_point import ArgumentParser, run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("train_tokenizer", lambda: _train(argv))


def _train(argv: list[str] | None) -> int:
    from megamft.data.preprocess import input_files
    from megamft.data.train_tokenizer import train_sentencepiece

    parser = ArgumentParser(
        prog="train_tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input", required=True, nargs="+", help=".jsonl/.jsonl.gz files or folders"
    )
    parser.add_argument("--out", required=True, type=Path, help="the .model file to write")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument(
        "--special",
        action="append",
        default=[],
        help="a token kept whole, e.g. <|im_start|> (repeatable)",
    )
    parser.add_argument("--max-texts", type=int, default=200_000, help="texts sampled for training")
    args = parser.parse_args(argv)
    files = input_files("tokenizer", args.input)
    path = train_sentencepiece(files, args.out, args.vocab_size, args.special, args.max_texts)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`megamft-convert`: argument parsing and progress bars over hf_convert."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megamft.entry_point import ArgumentParser, run_command
from megamft.errors import UserError

_DTYPES = ("bf16", "fp16", "fp32")


def _dtype(name: str | None):
    import torch

    return (
        {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        if name
        else None
    )


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="megamft-convert", description=__doc__)
    commands = parser.add_subparsers(dest="direction", required=True)
    to_megatron = commands.add_parser(
        "hf-to-megatron", help="Hugging Face folder -> megamft checkpoint"
    )
    to_megatron.add_argument(
        "--hf", required=True, type=Path, help="folder with config.json and safetensors"
    )
    to_megatron.add_argument(
        "--out", required=True, type=Path, help="megamft checkpoint folder to create"
    )
    to_megatron.add_argument(
        "--target-tp",
        type=int,
        default=1,
        help="TP of the training run: each of its ranks then reads only its own shard",
    )
    to_megatron.add_argument(
        "--target-pp",
        type=int,
        default=1,
        help="PP of the training run: one data file per TP x PP rank",
    )
    to_megatron.add_argument(
        "--dtype", choices=_DTYPES, help="store as (default: as in the source)"
    )
    to_megatron.add_argument(
        "--dry-run", action="store_true", help="print the planned mapping, write nothing"
    )
    to_megatron.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out that holds something other than an earlier conversion",
    )
    to_hf = commands.add_parser("megatron-to-hf", help="megamft checkpoint -> Hugging Face folder")
    to_hf.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="save folder (uses 'latest'), iter_* folder, "
        "or <save_dir>/best (the best checkpoint by checkpoint.best_metric)",
    )
    to_hf.add_argument("--out", required=True, type=Path, help="Hugging Face folder to create")
    to_hf.add_argument(
        "--hf-template", type=Path, help="original HF folder: tokenizer files and extra config keys"
    )
    to_hf.add_argument("--dtype", choices=_DTYPES, help="save as (default: as stored)")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard")
    to_hf.add_argument(
        "--adapters-only",
        action="store_true",
        help="write the LoRA adapters as a PEFT adapter (adapter_config.json, "
        "adapter_model.safetensors) for the Hugging Face base, instead of merged weights",
    )
    to_hf.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out that holds something other than an earlier export",
    )
    return parser


def _print_plan(model, chunks) -> None:
    print(f"model: {model}")
    pieces = {}
    for chunk in chunks:
        pieces.setdefault(chunk.key, []).append(chunk)
    for key, stored in pieces.items():  # one line per megatron tensor, not per layer or piece
        first = stored[0]
        print(
            f"  {key:<60} {tuple(first.global_shape)} {str(first.dtype).removeprefix('torch.')} "
            f"in {len(stored)} chunk(s) of {tuple(first.shape)}"
        )


def _hf_to_megatron(args) -> None:
    from tqdm import tqdm

    from megamft.checkpoint import hf_convert

    dtype = _dtype(args.dtype)
    model, _, chunks, _ = hf_convert.plan_hf_to_megatron(
        args.hf, dtype, args.target_tp, args.target_pp
    )
    if args.dry_run:
        _print_plan(model, chunks)
        return
    # disable=None: a bar on a terminal only, not in a log
    with tqdm(total=len(chunks), desc="hf-to-megatron", unit="tensor", disable=None) as bar:
        path = hf_convert.hf_to_megatron(
            args.hf,
            args.out,
            dtype,
            progress=lambda chunk: bar.update(),
            overwrite=args.overwrite,
            tp=args.target_tp,
            pp=args.target_pp,
        )
    print(f"wrote {path}\nmodel section: {args.out / 'megamft_model.yaml'}")


def _megatron_to_hf(args) -> None:
    from tqdm import tqdm

    from megamft.checkpoint import hf_convert

    if args.hf_template is not None and not args.hf_template.is_dir():
        raise UserError(
            f"--hf-template {args.hf_template} is not a folder; give the Hugging Face folder the "
            "checkpoint was converted from (or leave --hf-template out)"
        )
    dtype = _dtype(args.dtype)
    if args.adapters_only:
        out = hf_convert.megatron_to_peft(
            args.checkpoint, args.out, args.hf_template, dtype, args.overwrite
        )
        print(f"wrote {out} (PEFT adapter)")
        return
    bars = []  # opened at the first layer written: a refusal before it is one line, without a bar

    def progress(layer) -> None:
        if not bars:
            bars.append(tqdm(desc="megatron-to-hf", unit="layer", disable=None))
        bars[0].update()

    try:
        out = hf_convert.megatron_to_hf(
            args.checkpoint,
            args.out,
            args.hf_template,
            dtype,
            int(args.max_shard_gb * 2**30),
            progress=progress,
            overwrite=args.overwrite,
        )
    finally:
        for bar in bars:
            bar.close()
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    return run_command("megamft-convert", lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.direction == "hf-to-megatron" and min(args.target_tp, args.target_pp) < 1:
        raise UserError("--target-tp and --target-pp must be >= 1")
    if args.direction == "hf-to-megatron":
        _hf_to_megatron(args)
    else:
        _megatron_to_hf(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

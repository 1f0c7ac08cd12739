"""Bytes each rank reads to load a converted checkpoint, against the shard it holds, in one run.

    python benchmarks/conversion_reads.py [--tp 2 --layers 4 --hidden 1024 --ffn 2816 --vocab 32000]

Writes a random Llama-format Hugging Face checkpoint (see conversion_memory), converts it in fp32
(the precision the ranks hold it in) and loads it with megatron's dist_checkpointing.load on
--tp real ranks at TP=--tp, for each way of storing it:
  whole layers    the previous layout: each layer's tensor one chunk, one file (rebuilt here from
                  the conversion through megamft's global view)
  converted TP=n  megamft-convert --target-tp n (pieces of TP=n ranks, one file per rank), for
                  n = 1, --tp / 2, --tp and 2 x --tp
Each rank's bytes read during the load (/proc/self/io rchar; megamft.testing.checkpoint_reads)
are printed against the bytes of the parameters it holds.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import torch
from conversion_memory import write_random_llama

from megamft.checkpoint import global_view, hf_convert
from megamft.checkpoint.layout import iteration_dir
from megamft.testing.checkpoint_reads import load_reads
from megamft.testing.distributed import launch


def _read_region(source, region):
    return global_view.read_regions(source, [region])[0]


def whole_layers_copy(converted: Path, out: Path) -> Path:
    """The same checkpoint stored as the converter stored it before: whole layers, one file."""
    source = iteration_dir(converted, 0)
    chunks = []
    for key, md in global_view.tensor_index(source).items():
        shape = tuple(md.size)
        layered = key.startswith("decoder.layers.")
        for layer in range(shape[0]) if layered else [None]:
            offsets = (layer,) + (0,) * (len(shape) - 1) if layered else (0,) * len(shape)
            region = (1, *shape[1:]) if layered else shape
            produce = partial(_read_region, source, global_view.Region(key, offsets, region))
            chunks.append(
                global_view.Chunk(key, offsets, region, shape, md.properties.dtype, produce)
            )
    global_view.write_checkpoint(out, 0, chunks, global_view.read_common(source))
    return out


def measure(checkpoint: Path, model_yaml: Path, tp: int) -> list[dict]:
    return launch(
        load_reads,
        tp,
        timeout=1800,
        kwargs=dict(
            checkpoint=str(checkpoint),
            model_yaml=str(model_yaml),
            overrides=(f"parallel.tensor_model_parallel_size={tp}",),
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tp", type=int, default=2, help="TP (= ranks) of the loading run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = write_random_llama(tmp / "hf", args.layers, args.hidden, args.ffn, args.vocab)
        print(
            f"checkpoint: {2 * size / 2**20:.0f} MB in fp32; loaded at TP={args.tp} on {args.tp} ranks"
        )
        layouts = {}
        for target in sorted({1, max(1, args.tp // 2), args.tp, 2 * args.tp}):
            out = tmp / f"tp{target}"
            hf_convert.hf_to_megatron(tmp / "hf", out, dtype=torch.float32, tp=target)
            layouts[f"converted TP={target}"] = out
        yaml = layouts[f"converted TP={args.tp}"] / "megamft_model.yaml"
        layouts = {
            "whole layers (before)": whole_layers_copy(layouts["converted TP=1"], tmp / "whole"),
            **layouts,
        }
        print(
            f"{'stored as':<24}" + "".join(f"{f'rank {r} read / held':>28}" for r in range(args.tp))
        )
        for name, folder in layouts.items():
            cells = [
                f"{c['read'] / 2**20:7.1f} / {c['held'] / 2**20:5.1f} MB = {c['read'] / c['held']:4.2f}x"
                for c in measure(folder, yaml, args.tp)
            ]
            print(f"{name:<24}" + "".join(f"{cell:>28}" for cell in cells))


if __name__ == "__main__":
    main()

"""Peak memory of checkpoint conversion, streaming vs all-in-memory, measured in one run.

    python benchmarks/conversion_memory.py [--layers 12 --hidden 1536 --ffn 4096 --vocab 32000]

Writes a random Llama-format Hugging Face checkpoint (bf16, several shards)
into a temporary folder, then runs each measurement in a fresh process and
prints its peak resident memory above the process's baseline after imports:
  naive          load every tensor of the HF checkpoint, build the whole megatron state
  hf-to-megatron megamft's streaming conversion
  megatron-to-hf megamft's streaming export
Ratios are against the checkpoint's size and against the naive baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

_MEASURE = r"""
import resource, sys, json, torch
def rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from megamft.checkpoint import hf_convert
from safetensors.torch import load_file
from pathlib import Path
mode, src, dst = sys.argv[1:4]
base = rss_mb()
if mode == "naive":
    tensors = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        tensors.update({k: v.clone() for k, v in load_file(f).items()})
    model, _, chunks, source = hf_convert.plan_hf_to_megatron(Path(src))
    state = {(c.key, c.offsets): c.produce() for c in chunks}
elif mode == "hf-to-megatron":
    hf_convert.hf_to_megatron(src, dst)
else:
    hf_convert.megatron_to_hf(src, dst, max_shard_bytes=256 * 2**20)
print(json.dumps({"baseline_mb": base, "peak_mb": rss_mb()}))
"""


def write_random_llama(folder: Path, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """A random bf16 Llama checkpoint, one shard per layer; returns its size in bytes."""
    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, folder / name)
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    rand = lambda *shape: torch.randn(*shape, dtype=torch.bfloat16) * 0.02  # noqa: E731
    shard(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": rand(vocab, hidden),
            "lm_head.weight": rand(vocab, hidden),
            "model.norm.weight": rand(hidden),
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(
            f"layer{i}.safetensors",
            {
                p + "self_attn.q_proj.weight": rand(hidden, hidden),
                p + "self_attn.k_proj.weight": rand(hidden, hidden),
                p + "self_attn.v_proj.weight": rand(hidden, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, hidden),
                p + "mlp.gate_proj.weight": rand(ffn, hidden),
                p + "mlp.up_proj.weight": rand(ffn, hidden),
                p + "mlp.down_proj.weight": rand(hidden, ffn),
                p + "input_layernorm.weight": rand(hidden),
                p + "post_attention_layernorm.weight": rand(hidden),
            },
        )
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def measure(mode: str, src: Path, dst: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, mode, str(src), str(dst)],
        capture_output=True,
        text=True,
        check=True,
    )
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    return numbers["peak_mb"] - numbers["baseline_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size_mb = (
            write_random_llama(tmp / "hf", args.layers, args.hidden, args.ffn, args.vocab) / 2**20
        )
        largest_mb = max(args.vocab * args.hidden, 2 * args.ffn * args.hidden) * 2 / 2**20
        print(
            f"checkpoint: {size_mb:.0f} MB bf16, largest megatron tensor chunk {largest_mb:.0f} MB"
        )
        naive = measure("naive", tmp / "hf", tmp / "unused")
        rows = [
            ("naive (all in memory)", naive),
            ("hf-to-megatron", measure("hf-to-megatron", tmp / "hf", tmp / "megatron")),
            ("megatron-to-hf", measure("megatron-to-hf", tmp / "megatron", tmp / "hf_out")),
        ]
        print(f"{'conversion':<24}{'peak above baseline':>22}{'x checkpoint':>14}{'x naive':>10}")
        for name, peak in rows:
            print(f"{name:<24}{peak:>19.0f} MB{peak / size_mb:>14.2f}{peak / naive:>10.2f}")


if __name__ == "__main__":
    main()

"""Activation memory of core attention, torch backend vs megatron's local, as the sequence grows.

    python benchmarks/attention_memory.py [--seq 512 1024 2048 4096 --heads 8 --groups 2 --json]

One core-attention module (megamft's TorchCoreAttention, megatron's DotProductAttention),
unpacked causal rows, forward + backward of out.sum(); the figure is the peak device memory
above q, k, v and their gradients. On a GPU torch.cuda.max_memory_allocated measures it; on
a CPU the strict device emulation counts the bytes of emulated GPU tensors the same way.
The local backend materializes [b, heads, s, s] scores and probabilities (quadratic in s);
the torch backend's fused SDPA keeps a log-sum-exp per head and position (linear). Packed
rows are not measured here: on the CPU they take the block-diagonal mask fallback, quadratic
by construction; the GPU check measures the varlen path through benchmarks/train_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from megamft.emulation import cpu_emulation
from megamft.testing.distributed import free_port


def _parallel_state_of_one_rank() -> None:
    """A one-process gloo/nccl world: megatron's attention reads the TP group and its memory buffer."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        torch.distributed.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(
            0
        )  # the RNG tracker megatron's dropout forks


def core_attention(backend: str, heads: int, groups: int, head_dim: int, dtype: torch.dtype):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megamft.model.attention import TorchCoreAttention

    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
    )
    module = {"torch": TorchCoreAttention, "local": DotProductAttention}[backend]
    return module(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )


def peak_bytes(
    backend: str,
    seq: int,
    batch: int = 1,
    heads: int = 8,
    groups: int = 2,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Peak device bytes of one forward + backward above its inputs and their gradients."""
    attention = core_attention(backend, heads, groups, head_dim, dtype)
    g = torch.Generator().manual_seed(seq)
    q, k, v = (
        torch.randn(seq, batch, n, head_dim, generator=g).to("cuda", dtype).requires_grad_()
        for n in (heads, groups, groups)
    )
    input_grads = sum(
        t.numel() * t.element_size() for t in (q, k, v)
    )  # allocated by backward, not attention's
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attention(q, k, v, None).sum().backward()
    return torch.cuda.max_memory_allocated() - base - input_grads


def measure(seqs: list[int], heads: int, groups: int, dtype: torch.dtype) -> dict:
    _parallel_state_of_one_rank()
    rows = {}
    for backend in ("torch", "local"):
        rows[backend] = {
            seq: peak_bytes(backend, seq, heads=heads, groups=groups, dtype=dtype) for seq in seqs
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON line instead of the table"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        cpu_emulation.enable(strict=True)  # emulated device memory is counted
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = measure(sorted(args.seq), args.heads, args.groups, dtype)
    seqs = sorted(args.seq)
    growth = {b: rows[b][seqs[-1]] / rows[b][seqs[0]] for b in rows}
    if args.json:
        print(
            json.dumps(
                {
                    "seq": seqs,
                    "bytes": {b: [rows[b][s] for s in seqs] for b in rows},
                    "growth": growth,
                }
            )
        )
        return
    where = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else "CPU, strict emulation's device counter"
    )
    print(
        f"device: {where}; {args.dtype}; heads {args.heads}, KV groups {args.groups}, head dim 64, batch 1"
    )
    print(f"{'seq':>6}{'torch MB':>12}{'local MB':>12}{'local/torch':>13}")
    for seq in seqs:
        torch_mb, local_mb = rows["torch"][seq] / 2**20, rows["local"][seq] / 2**20
        print(f"{seq:>6}{torch_mb:>12.1f}{local_mb:>12.1f}{local_mb / torch_mb:>12.1f}x")
    factor = seqs[-1] / seqs[0]
    print(
        f"growth from seq {seqs[0]} to {seqs[-1]} (x{factor:g}): torch x{growth['torch']:.1f} "
        f"(linear would be x{factor:g}), local x{growth['local']:.1f} (quadratic would be x{factor**2:g})"
    )


if __name__ == "__main__":
    main()

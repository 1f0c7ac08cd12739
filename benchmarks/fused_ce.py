"""Fused multitask cross entropy vs unfused torch, forward + backward, in one run.

    python benchmarks/fused_ce.py [--tokens 8192 --vocab 32000 152064 --dtype bf16]

On a GPU: the csrc kernels against plain torch (fp32 upcast, F.cross_entropy,
per-task index_add), both timed with CUDA events after warm-up, with peak
memory from torch.cuda.max_memory_allocated. On a CPU the torch fallback runs
instead of the kernels under the strict device emulation, which measures device
memory and counts device-to-host synchronizations per call (timing is the CPU's).
Targets (issue 4): >= 1.5x faster and <= 0.5x peak memory of unfused.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from megamft.emulation import cpu_emulation
from megamft.loss.fused_ce import fused_multitask_cross_entropy

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(tokens: int, vocab: int, dtype, device, tasks: int = 8):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    mask = (torch.rand(tokens, generator=g) > 0.3).float().to(device)
    task_ids = torch.randint(0, tasks, (tokens,), generator=g).to(device)
    sample_index = (torch.arange(tokens) // 64).to(device)
    return logits, labels, mask / mask.sum(), mask, task_ids, sample_index, tasks, tokens // 64 + 1


def unfused(logits, labels, weights, mask, task_ids, sample_index, tasks, samples):
    x = logits.float()
    per_token = F.cross_entropy(x, labels, reduction="none")
    task_sums = torch.zeros(tasks, device=x.device, dtype=torch.float64).index_add_(
        0, task_ids, (per_token * mask).double()
    )
    (per_token * weights).sum().backward()
    return task_sums


def fused(logits, *rest):
    out = fused_multitask_cross_entropy(logits * 1, *rest, check_ids=False)  # as training calls it
    out.total.backward()
    return out.task_sums


def measure(fn, inputs, repeats: int, cuda: bool) -> tuple[float, float, float]:
    """(milliseconds per call, peak MB above the inputs, device-to-host syncs per call).

    Without CUDA the strict emulation measures device memory and counts syncs (no timing by events).
    """

    def call():
        leaf = inputs[0].detach().clone().requires_grad_()
        fn(leaf, *inputs[1:])

    call()  # warm-up (and the just-in-time build)
    syncs_before = cpu_emulation.sync_count()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            call()
        end.record()
        torch.cuda.synchronize()
        return (
            start.elapsed_time(end) / repeats,
            (torch.cuda.max_memory_allocated() - base) / 2**20,
            float("nan"),
        )
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    began = time.perf_counter()
    for _ in range(repeats):
        call()
    milliseconds = (time.perf_counter() - began) * 1000 / repeats
    syncs = (cpu_emulation.sync_count() - syncs_before) / repeats
    return milliseconds, (torch.cuda.max_memory_allocated() - base) / 2**20, syncs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:  # strict emulation: "cuda" tensors, measured device memory, counted syncs
        cpu_emulation.enable()
    device = "cuda"
    tokens = args.tokens if cuda else min(args.tokens, 1024)  # keep a CPU smoke run short
    where = (
        torch.cuda.get_device_name() if cuda else "CPU (torch fallback under the strict emulation)"
    )
    print(f"device: {where}; tokens {tokens}")
    print(
        f"{'dtype':<6}{'vocab':>8}{'unfused ms':>12}{'fused ms':>10}{'speed-up':>10}"
        f"{'unfused MB':>12}{'fused MB':>10}{'memory':>8}" + ("" if cuda else f"{'syncs/call':>12}")
    )
    for dtype_name in args.dtype:
        for vocab in args.vocab:
            inputs = make_inputs(tokens, vocab, DTYPES[dtype_name], device)
            base_ms, base_mb, _ = measure(unfused, inputs, args.repeats, cuda)
            ours_ms, ours_mb, ours_syncs = measure(fused, inputs, args.repeats, cuda)
            print(
                f"{dtype_name:<6}{vocab:>8}{base_ms:>12.2f}{ours_ms:>10.2f}{base_ms / ours_ms:>9.2f}x"
                f"{base_mb:>12.0f}{ours_mb:>10.0f}{ours_mb / base_mb if base_mb else float('nan'):>7.2f}x"
                + ("" if cuda else f"{ours_syncs:>12.1f}")
            )


if __name__ == "__main__":
    main()

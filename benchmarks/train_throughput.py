"""Training throughput of megamft against Hugging Face transformers (+ PEFT for LoRA), in one run.

    python benchmarks/train_throughput.py                       # GPU: 1b-full and 7b-lora, seq 4096
    python benchmarks/train_throughput.py --preset tiny         # CPU: a tiny model (a test runs this)
    python benchmarks/train_throughput.py --preset 1b-full --steps 8 --backends torch te

Same model shape (random weights: throughput does not depend on them), same packed rows of
random documents, same sequence length, precision and tokens per step, one row of seq tokens
per forward on both sides. megamft runs its real training step (megatron schedule, DDP,
distributed optimizer, clipping) once per attention backend (te and torch on a GPU; local
too on the CPU or when named). The baselines are transformers' strongest ordinary setups:
padding-free packing (DataCollatorWithFlattening, positions restarting per document) with
(a) SDPA, which transformers gives a dense block-diagonal document mask (a masked kernel),
and (b) torch's flash `varlen_attn` over the collator's cu_seqlens, registered as a
transformers attention function: the kernel megamft's torch backend uses (flash-attn's
package is not needed). torch AdamW (fused on CUDA), bf16 autocast over fp32 weights for full
fine-tunes as transformers' Trainer does, a bf16 frozen base under PEFT's fp32 adapters for
LoRA, clipping at 1.0, no activation checkpointing on either side. Prints per contender the
first step's loss (the transformers rows share their weights, so theirs must agree), median
step time as tokens/s, model TFLOP/s and MFU (document-causal attention, frozen weights
without weight gradients; against --peak-tflops, default by GPU name), peak memory, and
the ratio against the fastest transformers row. On a CPU the figures only prove that the
benchmark runs; compare GPU figures only.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

PRESETS = {
    # name: model shape, LoRA rank (0 = full fine-tune), sequence length, rows per step
    "tiny": dict(
        layers=2, hidden=64, ffn=176, heads=4, groups=2, vocab=512, lora=0, seq=256, rows=2
    ),
    "tiny-lora": dict(
        layers=2, hidden=64, ffn=176, heads=4, groups=2, vocab=512, lora=4, seq=256, rows=2
    ),
    # ~1.1B (TinyLlama's shape), full fine-tune
    "1b-full": dict(
        layers=22, hidden=2048, ffn=5632, heads=32, groups=4, vocab=32000, lora=0, seq=4096, rows=2
    ),
    # Llama-2-7B's shape, LoRA r=16 on the attention and MLP projections
    "7b-lora": dict(
        layers=32,
        hidden=4096,
        ffn=11008,
        heads=32,
        groups=32,
        vocab=32000,
        lora=16,
        seq=4096,
        rows=2,
    ),
}
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dense bf16 peak per device; the first name found in the device name wins (PCIe and NVL H100s are slower).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class Result:
    name: str
    tokens_per_s: float
    tflops: float
    mfu: float | None
    first_loss: float
    peak_gb: float | None


def packed_documents(preset: dict, steps: int, seed: int = 0) -> list[list[list[int]]]:
    """Per step, rows; per row, documents (token lists) filling exactly seq + 1 tokens."""
    g = torch.Generator().manual_seed(seed)
    seq, out = preset["seq"], []
    for _ in range(steps):
        rows = []
        for _ in range(preset["rows"]):
            docs, left = [], seq + 1
            while left > 0:
                n = min(left, int(torch.randint(seq // 8, seq // 2, (1,), generator=g)))
                n = left if left - n < 2 else n
                docs.append(torch.randint(3, preset["vocab"], (n,), generator=g).tolist())
                left -= n
            rows.append(docs)
        out.append(rows)
    return out


# ---------------------------------------------------------------- megamft


def _megamft_batch(rows: list[list[list[int]]], seq: int, packed_attention: str) -> dict:
    """A packed micro-batch of these rows, its boundaries as the backend reads them (PACKED_ATTENTION)."""
    import numpy as np

    from megamft.data.attention_boundaries import add_document_boundaries
    from megamft.data.sequences import document_attention_mask, document_boundaries

    tokens, labels, positions, samples = [], [], [], []
    for docs in rows:
        flat = [t for d in docs for t in d]
        tokens.append(flat[:seq])
        labels.append(flat[1 : seq + 1])
        positions.append([i for d in docs for i in range(len(d))][:seq])
        samples.append([k for k, d in enumerate(docs) for _ in d][:seq])
    sample_ids = torch.tensor(samples)
    batch = {
        "tokens": torch.tensor(tokens),
        "labels": torch.tensor(labels),
        "loss_mask": torch.ones(len(rows), seq),
        "task_ids": torch.zeros(len(rows), seq, dtype=torch.long),
        "sample_ids": sample_ids,
        "position_ids": torch.tensor(positions),
        "cu_seqlens": document_boundaries(np.asarray(sample_ids)),
    }
    if packed_attention == "mask":
        batch["attention_mask"] = document_attention_mask(sample_ids)
    add_document_boundaries(batch, packed_attention)
    return batch


def _megamft_config(preset: dict, backend: str, precision: str, micro_batch: int):
    from megamft.config import load_config

    p = preset
    overrides = [
        f"model.num_layers={p['layers']}",
        f"model.hidden_size={p['hidden']}",
        f"model.ffn_hidden_size={p['ffn']}",
        f"model.num_attention_heads={p['heads']}",
        f"model.num_query_groups={p['groups']}",
        f"model.vocab_size={p['vocab']}",
        f"model.max_position_embeddings={p['seq']}",
        f"data.seq_length={p['seq']}",
        f"train.micro_batch_size={micro_batch}",
        f"train.global_batch_size={p['rows']}",
        f"train.precision={precision}",
        f"model.attention_backend={backend}",
        "loss.mode=token",
        "optimizer.lr=1e-5",
        "optimizer.min_lr=1e-6",
        "model.make_vocab_size_divisible_by=128",
    ]
    if p["lora"]:
        overrides += ["lora.enabled=true", f"lora.rank={p['lora']}", f"lora.alpha={2 * p['lora']}"]
    return load_config([], overrides)


def run_megamft(
    preset: dict, steps: list, backend: str, precision: str, warmup: int
) -> tuple[list, float]:
    """(seconds of each step after warm-up, first step's loss) of megamft's training step."""
    from megamft.data.attention_boundaries import PACKED_ATTENTION
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state
    from megamft.training.step import LossSetup, train_step

    cfg = _megamft_config(preset, backend, precision, micro_batch=1)
    state = build_training_state(cfg, distributed.runtime(), preset["vocab"])
    batches = [
        [_megamft_batch([row], preset["seq"], PACKED_ATTENTION[backend]) for row in rows]
        for rows in steps
    ]
    losses = []

    def step(micro):
        losses.append(train_step(state, micro, ("all",), LossSetup(mode="token")).loss)

    return _timed([lambda m=m: step(m) for m in batches], warmup), losses[
        0
    ]  # the caller frees the model


# ---------------------------------------------------------------- transformers (+ PEFT)

HF_VARLEN = "torch_varlen"


def _hf_varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """transformers attention over one flattened row of documents, [1, heads, T, d] in, [1, T, heads, d] out.

    torch's flash varlen_attn over the collator's cu_seq_lens on a GPU; SDPA with the
    same documents' block-diagonal causal mask elsewhere (so the CPU run checks the plumbing).
    """
    import torch.nn.functional as F

    from megamft.model.attention import (
        block_diagonal_causal,
        flash_varlen_attention,
        varlen_available,
    )

    cu_seqlens, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    if torch.is_autocast_enabled(
        query.device.type
    ):  # RoPE's fp32 cos/sin hand q and k over in fp32
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if query.is_cuda and not varlen_available(query):
        _warn_once(
            f"{HF_VARLEN}: flash varlen_attn cannot run here ({query.dtype}, head dim {query.shape[-1]}, "
            f"torch {torch.__version__}); this row runs SDPA with a dense document mask"
        )
    if varlen_available(query):
        from megamft.model.attention import RowDocuments

        documents = RowDocuments(
            cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_document_length=longest
        )
        as_sbhd = [t.permute(2, 0, 1, 3) for t in (query, key, value)]  # [T, 1, heads, d]
        return flash_varlen_attention(*as_sbhd, documents, scaling, (-1, 0)).transpose(0, 1), None
    allowed = block_diagonal_causal(cu_seqlens, 1, query.shape[2])
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=allowed,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _warn_once(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run_transformers(
    preset: dict, steps: list, precision: str, warmup: int, device: str, attention: str
) -> tuple[list, float]:
    """(seconds of each step after warm-up, first step's loss) of a plain transformers training loop."""
    from transformers import (
        AttentionInterface,
        DataCollatorWithFlattening,
        LlamaConfig,
        LlamaForCausalLM,
    )

    AttentionInterface.register(HF_VARLEN, _hf_varlen_attention)
    p = preset
    config = LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["ffn"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["groups"],
        max_position_embeddings=p["seq"] + 1,
        attn_implementation=attention,
        # No KV cache in training: with one (transformers' default) its mask code skips
        # the packed-document detection and SDPA lets documents attend to each other.
        use_cache=False,
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # LoRA: a frozen base in bf16, as one fine-tunes with PEFT (autocast would re-cast fp32 frozen
    # weights at every use); a full fine-tune keeps fp32 master weights under autocast.
    base_dtype = dtype if p["lora"] and dtype is not None else torch.float32
    torch.manual_seed(
        0
    )  # the same weights for every attention implementation: their first losses must agree
    with torch.device(device):
        model = LlamaForCausalLM(config).to(base_dtype)
    if p["lora"]:
        from peft import LoraConfig, get_peft_model

        # PEFT keeps the adapters in fp32 over a bf16 base (autocast_adapter_dtype); one adapter per
        # projection (q, k, v, gate, up apart), where megamft fuses qkv and gate/up: the same FLOPs.
        model = get_peft_model(
            model,
            LoraConfig(
                r=p["lora"],
                lora_alpha=2 * p["lora"],
                target_modules=LORA_TARGETS_HF,
                lora_dropout=0.0,
            ),
        )
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")
    collator = DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=True)
    keep = (
        "input_ids",
        "labels",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    )
    # One flattened row of seq + 1 tokens per forward, as the collator makes it; built before timing.
    prepared = [
        [
            {
                k: v.to(device) if torch.is_tensor(v) else v
                for k, v in collator([{"input_ids": d} for d in docs]).items()
                if k in keep
            }
            for docs in rows
        ]
        for rows in steps
    ]
    losses = []

    def step(rows):
        total = 0.0
        for batch in rows:
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss / len(rows)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not losses:
            losses.append(float(total))  # one read, in a warm-up step

    return _timed([lambda r=r: step(r) for r in prepared], warmup), losses[0]


# ---------------------------------------------------------------- timing and report


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(calls: list, warmup: int) -> list[float]:
    """Seconds of each call after `warmup` untimed ones, the device synchronized around each."""
    for call in calls[:warmup]:
        call()
    seconds = []
    for call in calls[warmup:]:
        _synchronize()
        began = time.perf_counter()
        call()
        _synchronize()
        seconds.append(time.perf_counter() - began)
    return seconds


def _model_flops_per_step(preset: dict, steps: list) -> float:
    """Model FLOPs of one step (mean over the steps): document-causal attention, LoRA-aware."""
    from megamft.sizing.flops import model_flops

    cfg = _megamft_config(preset, "torch", "fp32", 1)
    per_step = []
    for rows in steps:
        lengths = []
        for docs in rows:  # the row's first seq tokens, cut where the row ends
            left = preset["seq"]
            for doc in docs:
                lengths.append(min(len(doc), left))
                left -= lengths[-1]
        per_step.append(model_flops(cfg, preset["vocab"], [n for n in lengths if n > 0]))
    return statistics.fmean(per_step)


def available_backends(cuda: bool) -> list[str]:
    """te where installed, torch; local (full s x s scores: out of memory at seq 4096 on a GPU) on the CPU only."""
    from megamft.platform.device import detect

    return (["te"] if detect().transformer_engine else []) + ["torch"] + ([] if cuda else ["local"])


def report(
    name: str, preset: dict, flops_per_step: float, measured: tuple[list, float], peak: float | None
) -> Result:
    seconds, first_loss = measured
    step = statistics.median(seconds)
    tflops = flops_per_step / step / 1e12
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return Result(
        name,
        preset["rows"] * preset["seq"] / step,
        tflops,
        tflops / peak if peak else None,
        first_loss,
        memory,
    )


def _peak(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cuda = torch.cuda.is_available()
    parser.add_argument(
        "--preset",
        nargs="+",
        choices=sorted(PRESETS),
        default=["1b-full", "7b-lora"] if cuda else ["tiny", "tiny-lora"],
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=("te", "torch", "local"),
        default=None,
        help="megamft attention backends (default: te where installed, torch; local on a CPU)",
    )
    parser.add_argument(
        "--steps", type=int, default=10 if cuda else 3, help="timed steps (after warm-up)"
    )
    parser.add_argument("--warmup", type=int, default=2 if cuda else 1)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="dense peak of one device, for MFU"
    )
    args = parser.parse_args()

    from megamft.config import load_config
    from megamft.platform import distributed
    from megamft.testing.distributed import free_port

    if not cuda:
        os.environ.setdefault("MEGAMFT_STRICT_DEVICE", "0")  # timing, not device checks
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    distributed.initialize(load_config([], []))  # a world of one
    device = "cuda" if cuda else "cpu"
    backends = args.backends or available_backends(cuda)
    peak = _peak(args)
    where = (
        torch.cuda.get_device_name()
        if cuda
        else "CPU (megatron under the CPU emulation; not comparable)"
    )
    print(
        f"device: {where}; precision {args.precision}; peak {peak or 'unknown'} TFLOP/s; "
        f"median of {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(
        "baselines: transformers LlamaForCausalLM, DataCollatorWithFlattening (padding-free packing), one "
        f"flattened row per forward; attn_implementation=sdpa (dense document mask) and {HF_VARLEN} (torch's "
        "flash varlen_attn over cu_seqlens; its mask fallback off CUDA); AdamW, clip 1.0, no activation "
        "checkpointing; full fine-tune: autocast over fp32 weights; LoRA: PEFT, bf16 frozen base, fp32 adapters. "
        "megamft: the same rows, micro-batch 1, no activation checkpointing. MFU: model FLOPs "
        "(document-causal attention, no weight gradients for frozen weights)"
    )
    try:
        for name in args.preset:
            _compare(name, PRESETS[name], args, backends, device, peak)
    finally:
        distributed.shutdown()


def _compare(name: str, preset: dict, args, backends: list, device: str, peak) -> None:
    """Every transformers baseline, then every megamft backend, with ratios against the fastest baseline."""
    steps = packed_documents(preset, args.warmup + args.steps)
    flops = _model_flops_per_step(preset, steps[args.warmup :])
    print(
        f"\n== {name}: {preset['layers']} layers, hidden {preset['hidden']}, seq {preset['seq']}, "
        f"{preset['rows']} rows/step ({preset['rows'] * preset['seq']} tokens)"
        + (f", LoRA r={preset['lora']}" if preset["lora"] else ", full fine-tune")
    )
    print(
        f"{'':<34}{'loss@1':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>8}{'peak GB':>9}{'vs fastest transformers':>25}"
    )
    peft = " + PEFT" if preset["lora"] else ""
    baselines = [
        _measure(
            f"transformers{peft} {attention}",
            preset,
            flops,
            peak,
            None,
            lambda a=attention: run_transformers(
                preset, steps, args.precision, args.warmup, device, a
            ),
        )
        for attention in ("sdpa", HF_VARLEN)
    ]
    fastest = max(
        (b for b in baselines if b is not None), key=lambda b: b.tokens_per_s, default=None
    )
    for backend in backends:
        if backend == "te" and preset["lora"]:
            print(
                f"{'megamft te':<34} skipped: LoRA runs on the torch backend (TE's norm-fused linears)"
            )
            continue
        _measure(
            f"megamft {backend}",
            preset,
            flops,
            peak,
            fastest,
            lambda b=backend: run_megamft(preset, steps, b, args.precision, args.warmup),
        )


def _measure(
    name: str, preset: dict, flops: float, peak, fastest: Result | None, run
) -> Result | None:
    """Run one contender and print its row at once, so an out-of-memory failure loses nothing else."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = None
    try:
        result = report(name, preset, flops, run(), peak)
    except torch.cuda.OutOfMemoryError:
        print(f"{name:<34} out of memory", flush=True)
    except (
        Exception
    ) as error:  # one contender's failure (a CUDA allocation, a kernel) must not end the rest
        if not torch.cuda.is_available():
            raise  # on the CPU a failure is a bug in the benchmark, which the test must see
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        print(f"{name:<34} failed: {type(error).__name__}: {first_line}", flush=True)
    finally:
        gc.collect()  # megatron's DDP hooks hold reference cycles: free the model before the next contender
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if result is None:
        return None
    mfu = f"{100 * result.mfu:.1f}%" if result.mfu is not None else "-"
    memory = f"{result.peak_gb:.1f}" if result.peak_gb is not None else "-"
    ratio = f"{result.tokens_per_s / fastest.tokens_per_s:.2f}x" if fastest else "-"
    print(
        f"{result.name:<34}{result.first_loss:>9.5f}{result.tokens_per_s:>11.0f}{result.tflops:>9.3g}{mfu:>8}"
        f"{memory:>9}{ratio:>25}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()

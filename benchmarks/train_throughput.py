"""Training throughput of megamft against Hugging Face transformers (+ PEFT for LoRA), in one run.

    python benchmarks/train_throughput.py                       # GPU: 1b-full and 7b-lora, seq 4096
    python benchmarks/train_throughput.py --preset tiny         # CPU: a tiny model (a test runs this)
    python benchmarks/train_throughput.py --preset 1b-full --steps 8 --backends torch te

Same model shape (random weights: throughput does not depend on them), same packed rows of
random documents, same sequence length, precision and tokens per step on both sides. megamft
runs its real training step (megatron schedule, DDP, distributed optimizer, clipping) once per
available attention backend. The baseline is the strongest ordinary transformers setup: SDPA
attention, padding-free packing (DataCollatorWithFlattening: one flattened row per step,
positions restarting per document), torch AdamW (fused on CUDA), bf16 autocast over fp32
weights as transformers' Trainer does, clipping at 1.0, no activation checkpointing on
either side; LoRA through PEFT with the same rank and target projections. Prints tokens/s,
TFLOP/s and MFU (against --peak-tflops, default by GPU name) and the ratios megamft/baseline.
On a CPU the figures only prove that the benchmark runs; compare GPU figures only.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

PRESETS = {
    # name: model shape, LoRA rank (0 = full fine-tune), sequence length, rows per step
    "tiny": dict(layers=2, hidden=64, ffn=176, heads=4, groups=2, vocab=512, lora=0, seq=256, rows=2),
    "tiny-lora": dict(layers=2, hidden=64, ffn=176, heads=4, groups=2, vocab=512, lora=4, seq=256, rows=2),
    # ~1.1B (TinyLlama's shape), full fine-tune
    "1b-full": dict(layers=22, hidden=2048, ffn=5632, heads=32, groups=4, vocab=32000, lora=0, seq=4096, rows=2),
    # Llama-2-7B's shape, LoRA r=16 on the attention and MLP projections
    "7b-lora": dict(layers=32, hidden=4096, ffn=11008, heads=32, groups=32, vocab=32000, lora=16, seq=4096, rows=2),
}
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


@dataclass
class Result:
    name: str
    tokens_per_s: float
    tflops: float
    mfu: float | None


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


def _megamft_batch(rows: list[list[list[int]]], seq: int) -> dict:
    import numpy as np

    from megamft.data.sequences import document_attention_mask, document_boundaries

    tokens, labels, positions, samples = [], [], [], []
    for docs in rows:
        flat = [t for d in docs for t in d]
        tokens.append(flat[:seq])
        labels.append(flat[1 : seq + 1])
        positions.append([i for d in docs for i in range(len(d))][:seq])
        samples.append([k for k, d in enumerate(docs) for _ in d][:seq])
    sample_ids = torch.tensor(samples)
    return {"tokens": torch.tensor(tokens), "labels": torch.tensor(labels),
            "loss_mask": torch.ones(len(rows), seq), "task_ids": torch.zeros(len(rows), seq, dtype=torch.long),
            "sample_ids": sample_ids, "position_ids": torch.tensor(positions),
            "attention_mask": document_attention_mask(sample_ids),
            "cu_seqlens": document_boundaries(np.asarray(sample_ids))}


def _megamft_config(preset: dict, backend: str, precision: str, micro_batch: int):
    from megamft.config import load_config

    p = preset
    overrides = [f"model.num_layers={p['layers']}", f"model.hidden_size={p['hidden']}",
                 f"model.ffn_hidden_size={p['ffn']}", f"model.num_attention_heads={p['heads']}",
                 f"model.num_query_groups={p['groups']}", f"model.vocab_size={p['vocab']}",
                 f"model.max_position_embeddings={p['seq']}", f"data.seq_length={p['seq']}",
                 f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={p['rows']}",
                 f"train.precision={precision}", f"model.attention_backend={backend}", "loss.mode=token",
                 "optimizer.lr=1e-5", "optimizer.min_lr=1e-6", "model.make_vocab_size_divisible_by=128"]
    if p["lora"]:
        overrides += ["lora.enabled=true", f"lora.rank={p['lora']}", f"lora.alpha={2 * p['lora']}"]
    return load_config([], overrides)


def run_megamft(preset: dict, steps: list, backend: str, precision: str, warmup: int) -> float:
    """Seconds per step (after warm-up) of megamft's training step."""
    from megamft.data.sequences import PACKED_ATTENTION, packed_seq_params, row_documents
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state
    from megamft.training.step import LossSetup, train_step

    form = PACKED_ATTENTION[backend]
    micro_batch = 1 if form == "thd" else preset["rows"]
    cfg = _megamft_config(preset, backend, precision, micro_batch)
    runtime = distributed.runtime()
    state = build_training_state(cfg, runtime, preset["vocab"])
    batches = []
    for rows in steps:
        micro = [_megamft_batch(rows[i : i + micro_batch], preset["seq"]) for i in range(0, len(rows), micro_batch)]
        for batch in micro:
            if form != "mask":
                batch["packed_seq_params"] = (packed_seq_params if form == "thd" else row_documents)(batch)
                del batch["attention_mask"]
        batches.append(micro)
    seconds = _timed([lambda b=b: train_step(state, b, ("all",), LossSetup(mode="token")) for b in batches], warmup)
    del state
    return seconds


# ---------------------------------------------------------------- transformers (+ PEFT)


def run_transformers(preset: dict, steps: list, precision: str, warmup: int, device: str) -> float:
    """Seconds per step of a plain transformers training loop on the same rows."""
    from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

    p = preset
    config = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["ffn"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                         num_key_value_heads=p["groups"], max_position_embeddings=p["seq"] + 1,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device)
    if p["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=p["lora"], lora_alpha=2 * p["lora"],
                                                 target_modules=LORA_TARGETS_HF, lora_dropout=0.0))
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")
    collator = DataCollatorWithFlattening(return_position_ids=True)
    autocast = precision != "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(rows):
        for docs in rows:  # one flattened row of seq + 1 tokens per forward, as the collator makes it
            batch = collator([{"input_ids": d} for d in docs])
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                loss = model(**batch).loss / len(rows)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed([lambda r=r: step(r) for r in steps], warmup)
    del model, optimizer
    return seconds


# ---------------------------------------------------------------- timing and report


def _timed(calls: list, warmup: int) -> float:
    for call in calls[:warmup]:
        call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    for call in calls[warmup:]:
        call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / max(1, len(calls) - warmup)


def _flops_per_token(preset: dict) -> float:
    from megamft.training.throughput import flops_per_token

    return flops_per_token(_megamft_config(preset, "torch", "fp32", 1), preset["vocab"])


def available_backends() -> list[str]:
    from megamft.platform.device import detect

    return (["te"] if detect().transformer_engine else []) + ["torch", "local"]


def report(name: str, preset: dict, seconds: float, peak: float | None) -> Result:
    tokens = preset["rows"] * preset["seq"]
    tflops = _flops_per_token(preset) * tokens / seconds / 1e12
    return Result(name, tokens / seconds, tflops, tflops / peak if peak else None)


def _peak(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS),
                        default=["1b-full", "7b-lora"] if cuda else ["tiny", "tiny-lora"])
    parser.add_argument("--backends", nargs="+", choices=("te", "torch", "local"), default=None,
                        help="megamft attention backends (default: every one available here)")
    parser.add_argument("--steps", type=int, default=6 if cuda else 3, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2 if cuda else 1)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak of one device, for MFU")
    args = parser.parse_args()

    from megamft.config import load_config
    from megamft.platform import distributed

    if not cuda:
        os.environ.setdefault("MEGAMFT_STRICT_DEVICE", "0")  # timing, not device checks
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    distributed.initialize(load_config([], []))  # a world of one
    device = "cuda" if cuda else "cpu"
    backends = args.backends or available_backends()
    peak = _peak(args)
    where = torch.cuda.get_device_name() if cuda else "CPU (megatron under the CPU emulation; not comparable)"
    print(f"device: {where}; precision {args.precision}; peak {peak or 'unknown'} TFLOP/s; "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print("baseline: transformers LlamaForCausalLM, attn_implementation=sdpa, DataCollatorWithFlattening "
          "(padding-free packing), AdamW, autocast over fp32 weights, clip 1.0, no activation checkpointing"
          " (+ PEFT LoRA for LoRA presets); megamft: the same rows, no activation checkpointing")
    try:
        for name in args.preset:
            preset = PRESETS[name]
            steps = packed_documents(preset, args.warmup + args.steps)
            print(f"\n== {name}: {preset['layers']} layers, hidden {preset['hidden']}, seq {preset['seq']}, "
                  f"{preset['rows']} rows/step ({preset['rows'] * preset['seq']} tokens)"
                  + (f", LoRA r={preset['lora']}" if preset["lora"] else ", full fine-tune"))
            print(f"{'':<24}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'vs baseline':>13}")
            base = _measure("transformers" + (" + PEFT" if preset["lora"] else ""), preset, peak, None,
                            lambda: run_transformers(preset, steps, args.precision, args.warmup, device),
                            baseline=True)
            for backend in backends:
                if backend == "te" and preset["lora"]:
                    print(f"{'megamft te':<24} skipped: LoRA runs on the torch backend (TE's norm-fused linears)")
                    continue
                _measure(f"megamft {backend}", preset, peak, base,
                         lambda b=backend: run_megamft(preset, steps, b, args.precision, args.warmup))
    finally:
        distributed.shutdown()


def _measure(name: str, preset: dict, peak, base, run, baseline: bool = False):
    """Run one contender and print its row at once, so an out-of-memory failure loses nothing else."""
    try:
        result = report(name, preset, run(), peak)
    except torch.cuda.OutOfMemoryError:
        print(f"{name:<24} out of memory")
        torch.cuda.empty_cache()
        return None
    mfu = f"{100 * result.mfu:.1f}%" if result.mfu is not None else "-"
    if baseline or base is None:
        ratio = f"{'1.00x' if baseline else '-':>13}"
    else:
        ratio = f"{result.tokens_per_s / base.tokens_per_s:>12.2f}x"
    print(f"{result.name:<24}{result.tokens_per_s:>12.0f}{result.tflops:>10.3g}{mfu:>8}{ratio}", flush=True)
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()

"""QLoRA (NF4 base) against bf16 LoRA on the CPU quickstart: the two loss curves, step by step, in one run.

    python benchmarks/qlora_vs_lora.py                          # base 60 steps, then 40 LoRA steps each way
    python benchmarks/qlora_vs_lora.py --base-steps 120 --steps 80 --out /tmp/qlora_vs_lora

The quickstart (examples/quickstart.yaml: the tiny Llama-style model, TP=2 over 2 processes, the embedded
corpus) first trains a base model in full (--base-steps) and saves it. Both contenders then start from that
checkpoint with the same LoRA adapters (same lora.seed, rank 8 on every projection), the same data order
and the same bf16 training precision; they differ in one setting only: lora.quantize_base=nf4, which holds
the frozen base linears as bitsandbytes' 4-bit NF4 with double quantization and dequantizes them in each
forward and backward. Every step's training loss comes from each run's metrics.jsonl; the table prints both,
their difference (QLoRA - LoRA) and ratio, and a summary over the steps.

What to expect: NF4 rounds each weight to one of 16 levels scaled by its block's absolute maximum (blocks of
64), an error of a few percent of a weight's size; the LoRA-adapted model therefore starts from a slightly
different function and the curves should track each other closely, QLoRA a little above, not diverge.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
LORA = (
    "lora.enabled=true",
    "lora.rank=8",
    "lora.alpha=16",
    "lora.save_adapters_only=true",
    "train.precision=bf16",
    "checkpoint.load_optimizer=false",
)


def _train(out: Path, name: str, overrides: list[str], nproc: int) -> dict[int, float]:
    """One quickstart run (torchrun, the quickstart's 2 processes); its training loss per step."""
    save = out / name
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "-m",
        "megamft",
        "train",
        "--config",
        str(QUICKSTART),
        f"checkpoint.save_dir={save}",
        "train.log_interval=1",
        *overrides,
    ]
    started = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"{name}: training failed (exit {result.returncode}); see {out / f'{name}.log'}")
    print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    losses = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            losses[record["step"]] = record["train/loss"]
    return losses


def _table(lora: dict[int, float], qlora: dict[int, float]) -> list[str]:
    rows = [f"{'step':>5} {'LoRA bf16':>10} {'QLoRA nf4':>10} {'diff':>8} {'ratio':>7}"]
    for step in sorted(set(lora) & set(qlora)):
        a, b = lora[step], qlora[step]
        rows.append(f"{step:>5} {a:>10.4f} {b:>10.4f} {b - a:>+8.4f} {b / a:>7.4f}")
    return rows


def _summary(lora: dict[int, float], qlora: dict[int, float]) -> list[str]:
    steps = sorted(set(lora) & set(qlora))
    diffs = [qlora[s] - lora[s] for s in steps]
    relative = [abs(d) / lora[s] for d, s in zip(diffs, steps)]
    last = steps[-5:]
    return [
        f"steps compared: {len(steps)}",
        f"mean difference QLoRA - LoRA: {statistics.mean(diffs):+.4f} nats "
        f"(mean |difference| {statistics.mean(map(abs, diffs)):.4f}, max {max(map(abs, diffs)):.4f})",
        f"mean |difference| / LoRA loss: {statistics.mean(relative):.4%} (max {max(relative):.4%})",
        f"loss drop over the run: LoRA {lora[steps[0]] - lora[steps[-1]]:.4f}, "
        f"QLoRA {qlora[steps[0]] - qlora[steps[-1]]:.4f}",
        f"last {len(last)} steps' mean: LoRA {statistics.mean(lora[s] for s in last):.4f}, "
        f"QLoRA {statistics.mean(qlora[s] for s in last):.4f}, "
        f"ratio {statistics.mean(qlora[s] for s in last) / statistics.mean(lora[s] for s in last):.4f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base-steps", type=int, default=60, help="full fine-tuning steps of the base model"
    )
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps of each contender")
    parser.add_argument(
        "--nproc", type=int, default=2, help="processes (the quickstart's TP=2 needs 2)"
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the runs (default: a new temporary folder)"
    )
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="qlora_vs_lora_"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _train(out, "base", [f"train.train_steps={args.base_steps}"], args.nproc)
    adapted = [
        *LORA,
        f"checkpoint.load_dir={out / 'base'}",
        f"train.train_steps={args.steps}",
        "train.lr_warmup_steps=4",
    ]
    lora = _train(out, "lora_bf16", adapted, args.nproc)
    qlora = _train(out, "qlora_nf4", [*adapted, "lora.quantize_base=nf4"], args.nproc)
    print(
        f"QLoRA (lora.quantize_base=nf4) vs bf16 LoRA on examples/quickstart.yaml: base {args.base_steps} "
        f"full steps, then {args.steps} LoRA steps (rank 8, alpha 16, bf16), same seeds and data; runs in {out}"
    )
    print("\n".join(_table(lora, qlora) + [""] + _summary(lora, qlora)))


if __name__ == "__main__":
    main()

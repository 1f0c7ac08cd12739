"""Preference pairs padded (data.mode=pad) vs packed (data.mode=pack), in one run.

    python benchmarks/preference_packing.py [--pairs 200 --steps 12 --seq-length 128]

Makes the DPO example's synthetic pairs (examples/data/synthetic_preferences.py), preprocesses them,
then: (1) counts the rows of every micro-batch of the first steps' global batches both ways (the
schedule's pairs, split as training splits them: `step_rows` for packed); (2) trains examples/dpo.yaml
from its seeded initialization for --steps steps each way, one process, and reports the median
train/tokens_per_second after the first two steps (the same learned tokens either way, so the ratio
is the speed-up) and the last loss of each (equal up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prepare(folder: Path, pairs: int, seq_length: int) -> Path:
    raw, data = folder / "pairs.jsonl", folder / "data"
    run = dict(check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    script = ROOT / "examples" / "data" / "synthetic_preferences.py"
    subprocess.run([sys.executable, str(script), str(raw), "--pairs", str(pairs)], **run)
    preprocess = ["-m", "megamft.data.preprocess_cli", "--task", f"sort={raw}", "--out", str(data)]
    limit = ["--max-seq-length", str(seq_length + 1), "--overlong", "drop", "--quiet"]
    subprocess.run([sys.executable, *preprocess, *limit], **run)
    return data


def _rows(data: Path, seq_length: int, steps: int) -> tuple[int, int]:
    """(padded rows, packed rows) of the first `steps` global batches."""
    from megamft.config import load_config
    from megamft.data.dataset import load_data
    from megamft.data.pairs import PairSchedule, split_pairs, step_rows

    cfg = load_config([str(ROOT / "examples" / "dpo.yaml")], [f"data.path={data}"])
    stores = load_data(cfg.data).stores
    per_micro = cfg.train.micro_batch_size // 2
    schedule = PairSchedule(
        [len(s.lengths) // 2 for s in stores],
        cfg.data.valid_samples_per_task,
        cfg.train.global_batch_size // 2,
        cfg.data.seed,
    )
    padded = packed = 0
    for step in range(steps):
        pairs = schedule.step(step)
        cuts = len(split_pairs(pairs, 0, 1, per_micro))
        padded += cuts * 2 * per_micro
        packed += cuts * step_rows(pairs, stores, seq_length, 1, per_micro)
    return padded, packed


def _train(data: Path, save: Path, mode: str, steps: int, seq_length: int) -> dict:
    overrides = [
        f"data.path={data}",
        f"data.mode={mode}",
        f"data.seq_length={seq_length}",
        f"train.train_steps={steps}",
        "train.log_interval=1",
        f"train.eval_interval={steps + 1}",
        f"checkpoint.save_dir={save}",
        f"checkpoint.save_interval={steps + 1}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(os.cpu_count())}
    cmd = [sys.executable, "-m", "megamft", "train", "--config", "examples/dpo.yaml", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    speed = [r["train/tokens_per_second"] for r in train[2:]]
    return {"tokens_per_s": statistics.median(speed), "last_loss": train[-1]["train/loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-length", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = _prepare(folder, args.pairs, args.seq_length)
        padded, packed = _rows(data, args.seq_length, args.steps)
        print(
            f"rows over {args.steps} steps: padded {padded}, packed {packed}, "
            f"ratio packed/padded {packed / padded:.3f}"
        )
        pad = _train(data, folder / "pad", "pad", args.steps, args.seq_length)
        pack = _train(data, folder / "pack", "pack", args.steps, args.seq_length)
        print(f"pad : {pad['tokens_per_s']:.0f} learned tokens/s, last loss {pad['last_loss']:.6f}")
        print(
            f"pack: {pack['tokens_per_s']:.0f} learned tokens/s, last loss {pack['last_loss']:.6f}"
        )
        print(f"speed-up pack/pad: {pack['tokens_per_s'] / pad['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()

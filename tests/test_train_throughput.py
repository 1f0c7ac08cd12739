"""benchmarks/train_throughput.py runs end to end on the CPU (tiny model), so it cannot rot before a GPU runs it."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([\d.]+)"


def test_throughput_benchmark_compares_every_backend_with_transformers_and_peft():
    # The CPU presets even where a GPU is visible (the GPU check runs the GPU presets itself).
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "train_throughput.py"),
            "--steps",
            "1",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert (
        "DataCollatorWithFlattening" in out and "sdpa" in out and "varlen_attn" in out
    )  # the baselines are stated
    for peft in ("", " + PEFT"):
        # Both transformers rows run the same weights on the same tokens: the varlen attention function
        # (here its cu_seqlens mask fallback) isolates the documents as SDPA's dense document mask does.
        losses = [
            float(
                re.search(
                    rf"^transformers{re.escape(peft)} {attention}\s+{NUMBER}\s+{NUMBER}", out, re.M
                ).group(1)
            )
            for attention in ("sdpa", "torch_varlen")
        ]
        assert abs(losses[0] - losses[1]) < 1e-4, out
    for backend in ("torch", "local"):  # one row per megamft backend and preset, with its ratio
        rows = re.findall(
            rf"^megamft {backend}\s+{NUMBER}\s+{NUMBER}\s+\S+\s+\S+\s+\S+\s+{NUMBER}x$", out, re.M
        )
        assert len(rows) == 2, out
        for loss, tokens, ratio in rows:
            assert 5.0 < float(loss) < 7.5 and float(tokens) > 0 and float(ratio) > 0, (
                out
            )  # ~ln(512) at the start

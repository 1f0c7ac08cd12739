"""benchmarks/train_throughput.py runs end to end on the CPU (tiny model), so it cannot rot before a GPU runs it."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_compares_every_backend_with_transformers_and_peft():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--steps", "1",
                           "--warmup", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "DataCollatorWithFlattening" in out and "sdpa" in out  # the baseline is stated
    for baseline in ("transformers ", "transformers + PEFT"):
        assert re.search(rf"^{re.escape(baseline)}\s+\d+", out, re.M), out
    for backend in ("torch", "local"):  # one row per megamft backend and preset, with its ratio
        rows = re.findall(rf"^megamft {backend}\s+(\d+)\s+\S+\s+\S+\s+([\d.]+)x$", out, re.M)
        assert len(rows) == 2 and all(float(tokens) > 0 and float(ratio) > 0 for tokens, ratio in rows), out

"""The JSON report, rewritten atomically after every change that matters, and its printed summary."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import threading
import time
from pathlib import Path

from .profiles import CHECKS, Profile

REPORT_NAME = "gpu_check.json"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def say(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def json_safe(value):
    """NaN and infinities as strings, so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class Report:
    """The JSON report, rewritten atomically after every change that matters."""

    def __init__(self, out_dir: Path, profile: Profile, budget_s: float):
        self.path = out_dir / REPORT_NAME
        self.lock = threading.RLock()
        self.began = time.monotonic()
        self.data = {
            "schema_version": 1,
            "mode": profile.name,
            "status": "running",
            "started_at": now(),
            "updated_at": now(),
            "finished_at": None,
            "elapsed_s": 0.0,
            "budget_s": budget_s,
            "out_dir": str(out_dir),
            "host": platform.node(),
            "install": _install_log(out_dir),
            "versions": {},
            "gpu": {},
            "checks": {name: {"status": "pending"} for name in CHECKS},
            "summary": {},
        }

    def save(self) -> None:
        with self.lock:
            self.data["updated_at"] = now()
            self.data["elapsed_s"] = round(time.monotonic() - self.began, 1)
            checks = self.data["checks"].values()
            counts = {
                s: sum(c["status"] == s for c in checks) for s in ("passed", "failed", "not_run")
            }
            self.data["summary"] = {
                **counts,
                "total": len(CHECKS),
                "all_passed": counts["passed"] == len(CHECKS),
            }
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(json_safe(self.data), indent=2) + "\n")
            os.replace(tmp, self.path)


def _install_log(out_dir: Path) -> list:
    """Steps gpu_check.sh recorded (name, exit status, seconds), if it ran."""
    path = out_dir / "install_steps.tsv"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            steps.append(
                {
                    "step": parts[0],
                    "rc": int(parts[1]) if parts[1].lstrip("-").isdigit() else parts[1],
                    "seconds": float(parts[2]) if parts[2].replace(".", "").isdigit() else parts[2],
                    **({"note": parts[3]} if len(parts) > 3 else {}),
                }
            )
    return steps


def summarize(path: Path) -> int:
    """Print a report's checks as a table; exit 0 if all passed."""
    if path.is_dir():
        path = path / REPORT_NAME
    if not path.is_file():
        print(f"no report at {path}")
        return 2
    data = json.loads(path.read_text())
    versions, gpu = data.get("versions", {}), data.get("gpu", {})
    print(
        f"\nmegamft GPU check ({data.get('mode')}), {data.get('status')}, {data.get('elapsed_s')} s: {path}"
    )
    print(
        f"  python {versions.get('python')} | torch {versions.get('torch')} (CUDA {versions.get('torch_cuda')}) | "
        f"megatron-core {versions.get('megatron_core')} | megamft {versions.get('megamft_commit') or '?'} "
        f"(source {versions.get('megamft_source_sha256')})"
    )
    if gpu.get("name"):
        print(
            f"  GPU: {gpu.get('name')}, {gpu.get('memory_gb')} GB, compute capability {gpu.get('capability')}"
        )
    for name, rec in data.get("checks", {}).items():
        seconds = rec.get("seconds")
        first = (rec.get("problems") or [""])[0]
        print(
            f"  {name:<20} {rec.get('status', '?').upper():<12} {'' if seconds is None else f'{seconds:6.1f} s'}"
            f"  {first[:150]}"
        )
    summary = data.get("summary", {})
    print(f"  {summary.get('passed', 0)}/{summary.get('total', len(CHECKS))} passed")
    return 0 if summary.get("all_passed") else 1

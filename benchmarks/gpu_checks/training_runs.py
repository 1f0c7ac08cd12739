"""One `python -m megamft train` subprocess, what its log says, and what it leaves on disk."""

from __future__ import annotations

import math
import re
from pathlib import Path

from .context import Context
from .process import float_or_nan, last_error, run_cmd, tail

_STEP = re.compile(r"step (\d+)/(\d+) \| loss (\S+) \|")
_FIELDS = {
    "grad_norm": re.compile(r"\| grad-norm (\S+) \|"),
    "tokens_per_s": re.compile(r"\| (\S+) tok/s \|"),
    "tflops_per_device": re.compile(r"\| (\S+) TFLOP/s/dev"),
    "memory_gb": re.compile(r"\| mem (\S+) GB"),
}
_SYNCS = re.compile(r"\| syncs (\d+)")


def parse_train_log(text: str) -> dict:
    """Per-step values from megamft's log lines (one line per step with train.log_interval=1)."""
    steps, losses, grad_norms, device_syncs, last = [], [], [], [], {}
    for line in text.splitlines():
        match = _STEP.search(line)
        if not match:
            continue
        steps.append(int(match.group(1)))
        losses.append(float_or_nan(match.group(3)))
        for key, pattern in _FIELDS.items():
            found = pattern.search(line)
            if found:
                last[key] = float_or_nan(found.group(1))
        grad_norms.append(last.get("grad_norm", float("nan")))
        syncs = _SYNCS.search(line)
        if syncs:
            device_syncs.append(int(syncs.group(1)))
    out = {
        "steps": steps,
        "losses": losses,
        "grad_norms": grad_norms,
        "final_loss": losses[-1] if losses else None,
        "finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "device_syncs": device_syncs,
        "skipped_steps": len(re.findall(r"step \d+ skipped: non-finite", text)),
    }
    out.update({k: last.get(k) for k in ("tokens_per_s", "tflops_per_device", "memory_gb")})
    valid = re.findall(r"valid \(after\) loss (\S+)", text)
    out["valid_after"] = float_or_nan(valid[-1]) if valid else None
    device = re.search(r"device: (.+)", text)
    out["device"] = device.group(1).strip() if device else None
    # loss.fused_cross_entropy on CUDA: the start-up's outcome (megamft.training.kernel_startup)
    kernels = re.search(
        r"fused cross entropy: (CUDA kernels from \S+|the CUDA extension is not available .*)", text
    )
    out["fused_kernels"] = kernels.group(1) if kernels else None
    return out


def train(ctx: Context, name: str, overrides: list, expect_steps: list) -> dict:
    """One `python -m megamft train` subprocess; returns what the report keeps about it."""
    cmd = [ctx.python, "-m", "megamft", "train", "--config", ctx.config_path, *overrides]
    result = run_cmd(
        cmd, ctx.work / "logs" / f"{name}.log", ctx.timeout(ctx.profile.run_timeout_s), ctx.env()
    )
    parsed = parse_train_log(result.output)
    problems = []
    if result.timed_out:
        problems.append(f"{name}: timed out after {result.seconds:.0f} s")
    elif result.rc != 0:
        problems.append(f"{name}: exit status {result.rc}: {last_error(result.output)}")
    if result.rc == 0 and parsed["steps"] != expect_steps:
        problems.append(f"{name}: logged steps {parsed['steps']}, expected {expect_steps}")
    if parsed["losses"] and not parsed["finite"]:
        problems.append(f"{name}: non-finite loss {parsed['losses']}")
    too_many = [n for n in parsed["device_syncs"] if n > ctx.profile.max_syncs_per_step]
    if (
        too_many
    ):  # e.g. a per-layer host read (megatron's unfused RoPE on packed rows does one per layer)
        problems.append(
            f"{name}: {max(too_many)} device-to-host synchronizations in a step "
            f"(limit {ctx.profile.max_syncs_per_step})"
        )
    if parsed["skipped_steps"]:
        problems.append(f"{name}: {parsed['skipped_steps']} step(s) skipped for non-finite values")
    entry = {**result.brief(), **parsed, "problems": problems}
    if problems:
        entry["output_tail"] = tail(result.output)
    return entry


def expected_steps(ctx: Context, first: int = 1) -> list:
    """The step numbers a run from step `first` logs."""
    return list(range(first, ctx.profile.config["train"]["train_steps"] + 1))


def latest_iteration(save_dir: Path) -> int | None:
    try:
        return int((save_dir / "latest").read_text().strip())
    except (OSError, ValueError):
        return None


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0

"""benchmarks/fused_ce.py: fused kernels vs unfused torch, time and memory, read from its printed table."""

from __future__ import annotations

import re

from .context import Context
from .process import float_or_nan, last_error, run_cmd, tail
from .report import finite

# dtype, vocab, unfused ms, fused ms, speed-up x, unfused MB, fused MB, memory x, then any further columns
_BENCH_ROW = re.compile(
    r"^(\w+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)x\s+(\S+)\s+(\S+)\s+(\S+)x(\s+.*)?$"
)


def check_benchmark(ctx: Context, rec: dict) -> list:
    details = rec["details"]
    cmd = [ctx.python, "benchmarks/fused_ce.py", *ctx.profile.bench_args]
    result = run_cmd(
        cmd, ctx.work / "logs" / "fused_ce_benchmark.log", ctx.timeout(10_000), ctx.env()
    )
    details.update(result.brief())
    lines = result.output.splitlines()
    details["table"] = [
        ln for ln in lines if ln.startswith(("device:", "dtype")) or _BENCH_ROW.match(ln)
    ]
    rows = details["rows"] = _rows(lines)
    problems = []
    if result.timed_out:
        problems.append(f"benchmark timed out after {result.seconds:.0f} s")
    elif result.rc != 0:
        problems.append(f"benchmark exit {result.rc}: {last_error(result.output)}")
    args = list(ctx.profile.bench_args)
    expected = (len(_arg_values(args, "--vocab")) or 2) * (len(_arg_values(args, "--dtype")) or 2)
    if result.rc == 0 and len(rows) != expected:
        problems.append(f"benchmark printed {len(rows)} result rows, expected {expected}")
    if any(not finite(r["fused_ms"]) or not finite(r["unfused_ms"]) for r in rows):
        problems.append("benchmark timings are not finite")
    if not ctx.dry and rows:  # issue 4's targets, reported (not required)
        details["targets"] = ">= 1.5x faster and <= 0.5x peak memory of unfused"
        details["targets_met"] = all(r["speedup"] >= 1.5 and r["memory_ratio"] <= 0.5 for r in rows)
    if problems:
        details["output_tail"] = tail(result.output)
    return problems


def _rows(lines: list) -> list:
    """The table's result rows as dicts; columns past the eighth named from the header."""
    header = next((ln for ln in lines if ln.startswith("dtype")), "")
    extra_names = header.split("memory", 1)[1].split() if "memory" in header else []
    rows = []
    for line in lines:
        match = _BENCH_ROW.match(line)
        if match:
            g = match.groups()
            row = {
                "dtype": g[0],
                "vocab": int(g[1]),
                "unfused_ms": float_or_nan(g[2]),
                "fused_ms": float_or_nan(g[3]),
                "speedup": float_or_nan(g[4]),
                "unfused_mb": float_or_nan(g[5]),
                "fused_mb": float_or_nan(g[6]),
                "memory_ratio": float_or_nan(g[7]),
            }
            extras = (g[8] or "").split()
            for i, value in enumerate(extras):  # columns added later (e.g. syncs/call)
                row[extra_names[i] if i < len(extra_names) else f"column_{9 + i}"] = float_or_nan(
                    value
                )
            rows.append(row)
    return rows


def _arg_values(args: list, flag: str) -> list:
    if flag not in args:
        return []
    values = []
    for value in args[args.index(flag) + 1 :]:
        if value.startswith("--"):
            break
        values.append(value)
    return values

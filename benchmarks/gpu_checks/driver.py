"""Runs the checks in order, each within its cap and the whole budget, writing the report after each."""

from __future__ import annotations

import json
import signal
import time
import traceback
from pathlib import Path

from .benchmark_check import check_benchmark
from .context import Context, Interrupted, NotRun
from .environment import check_environment
from .export_check import check_export
from .lora_te_check import check_lora_te
from .process import kill_children, tail
from .profiles import CHECKS, Profile
from .pytest_check import check_pytest
from .report import Report, now, say, summarize
from .training_checks import check_lora, check_loss_modes, check_resume

CHECK_FUNCTIONS = {
    "environment": check_environment,
    "pytest_cuda_tests": check_pytest,
    "train_loss_modes": check_loss_modes,
    "checkpoint_resume": check_resume,
    "lora": check_lora,
    "lora_te": check_lora_te,
    "hf_export": check_export,
    "fused_ce_benchmark": check_benchmark,
}
NEEDS_CUDA = {
    "train_loss_modes",
    "checkpoint_resume",
    "lora",
    "lora_te",
    "hf_export",
    "fused_ce_benchmark",
}


def run_checks(ctx: Context, only: list | None) -> None:
    report = ctx.report
    for name in CHECKS:
        rec = report.data["checks"][name]
        if only and name not in only and name != "environment":
            rec.update(status="not_run", problems=["not selected (--only)"])
            report.save()
            continue
        left = ctx.deadline - time.monotonic()
        if left < 10:
            rec.update(
                status="not_run",
                problems=[f"not run: the time budget ({ctx.report.data['budget_s']} s) was spent"],
            )
            say(f"{name}: not run (time budget spent)")
            report.save()
            continue
        if name in NEEDS_CUDA and not ctx.dry and ctx.cuda is False:
            rec.update(
                status="not_run", problems=["not run: CUDA is not available (see environment)"]
            )
            report.save()
            continue
        _run_one(ctx, name, rec, left)


def _run_one(ctx: Context, name: str, rec: dict, left: float) -> None:
    report = ctx.report
    cap = ctx.profile.caps[name]
    ctx.check_deadline = time.monotonic() + cap
    rec.update(status="running", started_at=now(), timeout_s=round(min(cap, left)), details={})
    report.save()
    say(f"{name}: started (at most {min(cap, left):.0f} s)")
    began = time.monotonic()
    try:
        problems = CHECK_FUNCTIONS[name](ctx, rec)
    except NotRun as why:
        rec.update(
            status="not_run", seconds=round(time.monotonic() - began, 1), problems=[str(why)]
        )
        report.save()
        say(f"{name}: NOT RUN - {why}")
        return
    except Interrupted:
        rec.update(
            status="interrupted",
            seconds=round(time.monotonic() - began, 1),
            problems=["interrupted (SIGTERM/SIGINT) while running"],
        )
        raise
    except Exception:  # noqa: BLE001 - one check's crash must not stop the others
        problems = [f"the check crashed: {traceback.format_exc().strip().splitlines()[-1]}"]
        rec["error"] = tail(traceback.format_exc(), 4000)
    seconds = round(time.monotonic() - began, 1)
    if time.monotonic() > ctx.check_deadline and problems:
        problems.append(f"{name} reached its time limit ({cap:.0f} s)")
    rec.update(status="failed" if problems else "passed", seconds=seconds, problems=problems)
    report.save()
    say(
        f"{name}: {rec['status'].upper()} in {seconds:.0f} s"
        + (f" - {problems[0]}" if problems else "")
    )


def run(out: Path, profile: Profile, budget: float, dry: bool, jobs: int, only: list | None) -> int:
    """Every check into `out`/gpu_check.json (work files under `out`/work); the summary's exit status."""
    out = out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    report = Report(out, profile, budget)
    ctx = Context(profile, out, work, report, time.monotonic() + budget, dry, jobs)
    ctx.config_path = work / "train_config.yaml"
    ctx.config_path.write_text(
        "# written by benchmarks/gpu_check.py (JSON is YAML)\n"
        + json.dumps(profile.config, indent=2)
        + "\n"
    )
    report.data["train_config"] = profile.config
    report.save()

    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    say(f"{profile.name} mode, budget {budget:.0f} s, report {report.path}")
    try:
        run_checks(ctx, only)
        report.data["status"] = "complete"
    except Interrupted as why:
        report.data["status"] = f"interrupted ({why})"
        for rec in report.data["checks"].values():
            if rec["status"] in ("pending", "running"):
                rec.setdefault("problems", ["not run: interrupted"])
                rec["status"] = "interrupted" if rec["status"] == "running" else "not_run"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kill_children()
        report.data["finished_at"] = now()
        report.save()
    return summarize(report.path)

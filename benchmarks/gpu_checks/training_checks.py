"""Training checks: every loss mode (fused and unfused), checkpoint resume, LoRA with adapter-only saves."""

from __future__ import annotations

import concurrent.futures
import shutil
import traceback

from .context import Context
from .process import kill_children
from .report import finite, say
from .training_runs import dir_bytes, expected_steps, latest_iteration, train


def check_loss_modes(ctx: Context, rec: dict) -> list:
    details = rec["details"]
    details["runs"] = {}
    details["concurrent_runs"] = ctx.jobs
    runs = {
        f"{mode}{'_fused' if fused else ''}": [
            f"loss.mode={mode}",
            f"loss.fused_cross_entropy={str(fused).lower()}",
        ]
        for mode, fused in ctx.profile.modes
    }
    problems = []

    def one(name: str, overrides: list) -> None:
        if ctx.left() < 5:
            entry = {
                "status": "not_run",
                "problems": [f"{name}: not run, the time budget was spent"],
            }
        else:
            say(f"  train {name}")
            try:
                entry = train(ctx, f"train_{name}", overrides, expected_steps(ctx))
            except Exception:  # noqa: BLE001 - reported with this run
                entry = {"problems": [f"{name}: {traceback.format_exc().strip().splitlines()[-1]}"]}
            entry["status"] = "failed" if entry["problems"] else "passed"
            say(
                f"  train {name}: {entry['status']}, final loss {entry.get('final_loss')}, "
                f"{entry.get('tokens_per_s')} tok/s, mem {entry.get('memory_gb')} GB, {entry.get('seconds')} s"
            )
        with ctx.report.lock:
            details["runs"][name] = entry
            ctx.report.save()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, ctx.jobs))
    try:
        for future in [pool.submit(one, name, overrides) for name, overrides in runs.items()]:
            future.result()
    except BaseException:  # interrupted: do not wait for the runs in flight
        pool.shutdown(wait=False, cancel_futures=True)
        kill_children()
        raise
    pool.shutdown()
    for name in runs:
        problems += details["runs"][name]["problems"]
    if not ctx.dry:  # the fused runs must have used the kernels built (or loaded) at start-up
        for mode, fused in ctx.profile.modes:
            run = details["runs"][f"{mode}_fused"] if fused else {}
            kernels = run.get("fused_kernels") or "no start-up line"
            if run.get("steps") and not kernels.startswith("CUDA"):
                problems.append(f"{mode}_fused: trained without the CUDA kernels ({kernels})")
    details["fused_vs_unfused"], mismatches = _fused_vs_unfused(ctx, details["runs"])
    return problems + mismatches


def _fused_vs_unfused(ctx: Context, runs: dict) -> tuple[dict, list]:
    """The same seed, data and weights: the fused loss must match the unfused one before any update."""
    comparison, problems = {}, []
    for mode, fused in ctx.profile.modes:
        a, b = runs.get(mode, {}), runs.get(f"{mode}_fused", {})
        if fused and a.get("losses") and b.get("losses"):
            rel = abs(a["losses"][0] - b["losses"][0]) / max(abs(a["losses"][0]), 1e-12)
            comparison[mode] = {
                "unfused_step1": a["losses"][0],
                "fused_step1": b["losses"][0],
                "rel_diff": rel,
                "unfused_tokens_per_s": a.get("tokens_per_s"),
                "fused_tokens_per_s": b.get("tokens_per_s"),
                "unfused_memory_gb": a.get("memory_gb"),
                "fused_memory_gb": b.get("memory_gb"),
            }
            if not rel <= ctx.profile.fused_rel_tol:
                problems.append(
                    f"{mode}: step-1 loss fused {b['losses'][0]} vs unfused {a['losses'][0]} "
                    f"(relative difference {rel:.2e} > {ctx.profile.fused_rel_tol})"
                )
    return comparison, problems


def check_resume(ctx: Context, rec: dict) -> list:
    details = rec["details"]
    steps = ctx.profile.config["train"]["train_steps"]
    half = steps // 2
    full, resumed = ctx.work / "ckpt_full", ctx.work / "ckpt_resumed"
    for folder in (full, resumed):
        shutil.rmtree(folder, ignore_errors=True)
    say(f"  uninterrupted run, saving every {half} steps")
    ref = train(
        ctx,
        "resume_reference",
        [f"checkpoint.save_dir={full}", f"checkpoint.save_interval={half}"],
        expected_steps(ctx),
    )
    details["reference"] = ref
    ctx.report.save()
    problems = list(ref["problems"])
    if ref["rc"] == 0 and latest_iteration(full) == steps:
        ctx.full_checkpoint = full
    else:
        return problems + [
            f"no complete checkpoint at step {steps} in {full} (latest: {latest_iteration(full)})"
        ]
    say(f"  resume from step {half}")
    # Continue the run from another folder: an explicit resume (checkpoint.resume=auto would take
    # load_dir as a base, weights only).
    res = train(
        ctx,
        "resume_continued",
        [
            f"checkpoint.load_dir={full}",
            f"checkpoint.load_iteration={half}",
            "checkpoint.resume=never",
            f"checkpoint.save_dir={resumed}",
        ],
        expected_steps(ctx, half + 1),
    )
    details["resumed"] = res
    problems += res["problems"]
    if res["rc"] == 0 and latest_iteration(resumed) != steps:
        problems.append(
            f"the resumed run saved no step-{steps} checkpoint (latest: {latest_iteration(resumed)})"
        )
    details["comparison"], mismatches = _resumed_vs_reference(ctx, ref, res)
    problems += mismatches
    details["tolerance"] = f"|diff| <= log rounding + {ctx.profile.resume_rel_tol} x |value|"
    return problems


def _resumed_vs_reference(ctx: Context, ref: dict, res: dict) -> tuple[list, list]:
    """Loss to 4 decimals and grad norm to 3 in the log: allow their rounding, plus a relative tolerance."""
    tol = ctx.profile.resume_rel_tol
    want = dict(zip(ref["steps"], zip(ref["losses"], ref["grad_norms"])))
    diffs, problems = [], []
    for step, loss, norm in zip(res["steps"], res["losses"], res["grad_norms"]):
        if step not in want:
            continue
        ref_loss, ref_norm = want[step]
        diffs.append(
            {
                "step": step,
                "reference_loss": ref_loss,
                "resumed_loss": loss,
                "reference_grad_norm": ref_norm,
                "resumed_grad_norm": norm,
            }
        )
        if not abs(loss - ref_loss) <= 1.01e-4 + tol * abs(ref_loss):
            problems.append(f"step {step}: resumed loss {loss} != uninterrupted {ref_loss}")
        if (
            finite(norm)
            and finite(ref_norm)
            and not abs(norm - ref_norm) <= 1.01e-3 + 5 * tol * abs(ref_norm)
        ):
            problems.append(f"step {step}: resumed grad norm {norm} != uninterrupted {ref_norm}")
    return diffs, problems


def check_lora(ctx: Context, rec: dict) -> list:
    details = rec["details"]
    folder = ctx.work / "ckpt_lora"
    shutil.rmtree(folder, ignore_errors=True)
    overrides = ["lora.enabled=true", "lora.rank=8", f"checkpoint.save_dir={folder}"]
    if ctx.full_checkpoint:  # fine-tune the trained model with adapters, saving the adapters only
        overrides += [
            f"checkpoint.load_dir={ctx.full_checkpoint}",
            "checkpoint.load_optimizer=false",
            "lora.save_adapters_only=true",
        ]
    details["base"] = str(ctx.full_checkpoint) if ctx.full_checkpoint else "random initialization"
    run = train(ctx, "lora", overrides, expected_steps(ctx))
    details["run"] = run
    ctx.lora_run = {"overrides": overrides, "run": run}
    problems = list(run["problems"])
    steps = ctx.profile.config["train"]["train_steps"]
    if run["rc"] == 0 and latest_iteration(folder) != steps:
        problems.append(f"no step-{steps} LoRA checkpoint in {folder}")
    elif run["rc"] == 0:
        ctx.lora_checkpoint = folder
        lora_bytes = dir_bytes(folder / f"iter_{steps:07d}")
        details["checkpoint_bytes"] = lora_bytes
        if ctx.full_checkpoint:
            full_bytes = dir_bytes(ctx.full_checkpoint / f"iter_{steps:07d}")
            details["full_checkpoint_bytes"] = full_bytes
            if not lora_bytes < full_bytes:
                problems.append(
                    f"the adapter-only checkpoint ({lora_bytes} bytes) is not smaller than a full one "
                    f"({full_bytes} bytes)"
                )
    return problems

"""LoRA with Transformer Engine: the TE spec whose norms are separate modules, against the local spec.

With model.attention_backend=te and LoRA on, megamft builds its layers from lora_spec's
te_separate_norm_layer_spec: TE's norms as modules of their own, the adapters on TE's column- and row-parallel
linears, TE's attention. The check runs the lora check's fine-tune (same base checkpoint, seed, data and
adapters) with that spec and compares it with the lora check's run, which used megatron's local spec:
the same model in other kernels, so step 1's loss and gradient norm must agree to bf16 GEMM rounding and
the later steps stay close. The run's log must say it used the te attention backend (the TE spec). Where Transformer Engine does not
import (the CPU dry run, a machine without it) the TE run must be refused with megamft's clear message,
which is what the check then verifies; on a GPU the check is reported not run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .context import Context, NotRun
from .process import last_error, run_cmd
from .training_runs import expected_steps, latest_iteration, train

TE_OVERRIDES = ("model.attention_backend=te",)
REFUSAL = "model.attention_backend=te needs Transformer Engine"


def transformer_engine_status(ctx: Context) -> tuple[bool, str]:
    """Whether megamft sees Transformer Engine in the checked environment (megamft.platform.device), and why not."""
    code = (
        "from megamft.platform.device import transformer_engine_status as s; ok, why = s(); "
        "print('TE_STATUS', ok, why or '')"
    )
    result = run_cmd(
        [ctx.python, "-c", code], ctx.work / "logs" / "te_status.log", ctx.timeout(60), ctx.env()
    )
    line = next(
        (text for text in result.output.splitlines() if text.startswith("TE_STATUS ")), None
    )
    if line is None:
        return False, f"the probe failed (exit {result.rc}): {last_error(result.output)}"
    _, ok, why = (line.split(" ", 2) + [""])[:3]
    return ok == "True", why.strip()


def compare_runs(local: dict, te: dict, step1_tol: float, curve_tol: float) -> tuple[list, list]:
    """Per-step losses and gradient norms of the TE run against the local one: (rows, problems).

    Step 1 starts from the same weights and adapters (B = 0): its loss and gradient norm differ only by the
    kernels' rounding (step1_tol, relative). Later steps follow different rounding through the updates,
    so they are held to curve_tol.
    """
    rows, problems = [], []
    ref = dict(
        zip(local.get("steps", []), zip(local.get("losses", []), local.get("grad_norms", [])))
    )
    for step, loss, norm in zip(
        te.get("steps", []), te.get("losses", []), te.get("grad_norms", [])
    ):
        if step not in ref:
            continue
        ref_loss, ref_norm = ref[step]
        loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
        norm_rel = abs(norm - ref_norm) / max(abs(ref_norm), 1e-12)
        rows.append(
            {
                "step": step,
                "local_loss": ref_loss,
                "te_loss": loss,
                "loss_rel_diff": loss_rel,
                "local_grad_norm": ref_norm,
                "te_grad_norm": norm,
                "grad_norm_rel_diff": norm_rel,
            }
        )
        tol = step1_tol if step == 1 else curve_tol
        if not loss_rel <= tol:
            problems.append(
                f"step {step}: TE LoRA loss {loss} vs local spec {ref_loss} (relative {loss_rel:.2e} "
                f"> {tol})"
            )
        if step == 1 and not norm_rel <= 2 * step1_tol:
            problems.append(
                f"step 1: TE LoRA grad norm {norm} vs local spec {ref_norm} (relative {norm_rel:.2e} "
                f"> {2 * step1_tol}): the adapters' gradients differ"
            )
    if not rows:
        problems.append("no step to compare: the TE and local LoRA runs logged no common step")
    return rows, problems


def check_lora_te(ctx: Context, rec: dict) -> list:
    details = rec["details"]
    installed, why = transformer_engine_status(ctx)
    details["transformer_engine"] = (
        "installed" if installed else f"not available: {why or 'not installed'}"
    )
    folder = ctx.work / "ckpt_lora_te"
    shutil.rmtree(folder, ignore_errors=True)
    local = ctx.lora_run
    same = (
        [o for o in local["overrides"] if not o.startswith("checkpoint.save_dir=")]
        if local
        else ["lora.enabled=true", "lora.rank=8"]
    )
    overrides = [*same, f"checkpoint.save_dir={folder}", *TE_OVERRIDES]
    if not installed:
        return _refused(ctx, details, overrides)
    if local is None or local["run"]["problems"]:
        return [
            "the lora check's run (the local spec's reference) did not complete; nothing to compare with"
        ]
    run = train(ctx, "lora_te", overrides, expected_steps(ctx))
    details["run"] = run
    problems = list(run["problems"])
    backend = re.search(r"attention backend: (\S+)", Path(run["log"]).read_text(errors="replace"))
    details["attention_backend"] = backend.group(1) if backend else None
    if run["rc"] == 0 and details["attention_backend"] != "te":
        problems.append(
            f"the run did not use the TE spec: its log says attention backend "
            f"{details['attention_backend']!r}"
        )
    steps = ctx.profile.config["train"]["train_steps"]
    if run["rc"] == 0 and latest_iteration(folder) != steps:
        problems.append(f"no step-{steps} adapter checkpoint in {folder}")
    rows, mismatches = compare_runs(
        local["run"], run, ctx.profile.lora_te_step1_tol, ctx.profile.lora_te_curve_tol
    )
    details["te_vs_local"] = rows
    details["tolerance"] = (
        f"step 1: relative {ctx.profile.lora_te_step1_tol} (loss), "
        f"{2 * ctx.profile.lora_te_step1_tol} (grad norm); later steps: relative "
        f"{ctx.profile.lora_te_curve_tol} (loss)"
    )
    return problems + mismatches


def _refused(ctx: Context, details: dict, overrides: list) -> list:
    """Without TE: the run must be refused clearly (the dry run's check); on a GPU the check is not run."""
    cmd = [ctx.python, "-m", "megamft", "train", "--config", ctx.config_path, *overrides]
    result = run_cmd(
        cmd, ctx.work / "logs" / "lora_te.log", ctx.timeout(ctx.profile.run_timeout_s), ctx.env()
    )
    details["refusal"] = {**result.brief(), "message": last_error(result.output)}
    if result.rc != 2 or REFUSAL not in result.output:
        return [
            f"without Transformer Engine the TE LoRA run must stop with exit 2 and '{REFUSAL}...'; got exit "
            f"{result.rc}: {last_error(result.output)}"
        ]
    if not ctx.dry:
        raise NotRun(
            "Transformer Engine does not import here (install transformer_engine[pytorch] for this torch "
            "and CUDA); the TE LoRA spec was not compared with the local one"
        )
    return []

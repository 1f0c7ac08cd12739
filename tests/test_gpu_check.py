"""benchmarks/gpu_check.sh --dry-run: the GPU machine check, run end to end on the CPU so it cannot rot."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_passes_every_check_and_writes_the_report(tmp_path):
    gpu_check = _gpu_check_module()
    out = tmp_path / "report"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("GPU_CHECK_BUDGET", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=370,
        cwd=ROOT,
        env=env,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    failed = {
        name: rec.get("problems")
        for name, rec in report["checks"].items()
        if rec["status"] != "passed"
    }
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-4000:], proc.stderr[-2000:])
    assert "train_loss_modes: PASSED" in proc.stdout and "8/8 passed" in proc.stdout
    assert (
        "megamft torch" in (out / "train_throughput.txt").read_text()
    )  # the throughput benchmark ran

    assert report["mode"] == "dry-run" and report["status"] == "complete"
    assert list(report["checks"]) == list(gpu_check.CHECKS)
    assert report["summary"] == {
        "passed": 8,
        "failed": 0,
        "not_run": 0,
        "total": 8,
        "all_passed": True,
    }
    versions = report["versions"]
    for key in ("python", "torch", "megatron_core", "megamft_path", "megamft_source_sha256"):
        assert versions[key], key
    assert (
        "torch_cuda" in versions
        and "megamft_commit" in versions
        and "cuda_available" in report["gpu"]
    )
    for name, rec in report["checks"].items():
        assert rec["seconds"] >= 0 and rec["problems"] == [], name

    runs = report["checks"]["train_loss_modes"]["details"]["runs"]
    assert set(runs) == {
        f"{mode}{'_fused' if fused else ''}" for mode, fused in gpu_check.DRY.modes
    }
    steps = gpu_check.DRY.config["train"]["train_steps"]
    for run in runs.values():
        assert run["steps"] == list(range(1, steps + 1)) and all(
            math.isfinite(x) for x in run["losses"]
        )
        assert run["tokens_per_s"] > 0 and run["memory_gb"] > 0
    assert "task_token" in report["checks"]["train_loss_modes"]["details"]["fused_vs_unfused"]

    resume = report["checks"]["checkpoint_resume"]["details"]
    assert [d["step"] for d in resume["comparison"]] == list(range(steps // 2 + 1, steps + 1))
    pytest_check = report["checks"]["pytest_cuda_tests"]["details"]
    assert pytest_check["passed"] and not pytest_check["failed"]
    assert pytest_check["cuda_related_skips"]  # on the CPU the CUDA tests are collected and skipped
    for label in ("full", "lora"):
        export = report["checks"]["hf_export"]["details"][label]
        assert not any(export["loading_info"].values()), export["loading_info"]
        assert export["max_abs_diff"] <= export["allowed_max_abs_diff"]
    assert report["checks"]["hf_export"]["details"]["lora"]["lora_parameters_in_megamft_model"] > 0
    assert report["checks"]["fused_ce_benchmark"]["details"]["rows"]


def test_a_killed_check_still_leaves_a_valid_report(tmp_path):
    """SIGTERM mid-run: the running check is marked interrupted, the rest not run."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--dry-run",
            "--out",
            str(out),
            "--only",
            "train_loss_modes",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    report_path = out / "gpu_check.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until a training run is under way
        if (
            report_path.is_file()
            and '"status": "running"' in report_path.read_text()
            and list((out / "work" / "logs").glob("train_*.log"))
        ):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    report = json.loads(report_path.read_text())
    assert report["status"].startswith("interrupted"), output
    assert report["checks"]["environment"]["status"] == "passed"
    assert report["checks"]["train_loss_modes"]["status"] == "interrupted"
    assert report["checks"]["hf_export"]["status"] == "not_run"
    assert report["finished_at"] and not report["summary"]["all_passed"]


def test_the_te_lora_comparison_holds_step_one_to_kernel_rounding_and_the_curve_looser():
    """lora_te's comparison (benchmarks/gpu_checks/lora_te_check.py) on logged runs: the same run passes; a
    step-1 loss or gradient norm off by more than the profile's tolerance fails, and so does a later loss off
    by more than the curve's; a later step within it passes."""
    gpu_check = _gpu_check_module()
    from gpu_checks.lora_te_check import compare_runs

    step1, curve = gpu_check.GPU.lora_te_step1_tol, gpu_check.GPU.lora_te_curve_tol
    local = {"steps": [1, 2, 3], "losses": [4.0, 3.8, 3.6], "grad_norms": [0.5, 0.4, 0.3]}

    def te(losses, norms=(0.5, 0.4, 0.3)):
        return {"steps": [1, 2, 3], "losses": list(losses), "grad_norms": list(norms)}

    rows, problems = compare_runs(local, te(local["losses"]), step1, curve)
    assert problems == [] and [r["step"] for r in rows] == [1, 2, 3]
    assert compare_runs(local, te([4.0 * (1 + 1.5 * step1), 3.8, 3.6]), step1, curve)[1][
        0
    ].startswith("step 1:")
    assert (
        "grad norm"
        in compare_runs(
            local, te(local["losses"], (0.5 * (1 + 3 * step1), 0.4, 0.3)), step1, curve
        )[1][0]
    )
    assert compare_runs(
        local, te([4.0, 3.8 * (1 + 0.5 * curve), 3.6 * (1 + 1.5 * curve)]), step1, curve
    )[1] == [
        f"step 3: TE LoRA loss {3.6 * (1 + 1.5 * curve)} vs local spec 3.6 (relative "
        f"{1.5 * curve:.2e} > {curve})"
    ]
    assert compare_runs(local, {"steps": [], "losses": [], "grad_norms": []}, step1, curve)[1]


@pytest.mark.slow
def test_the_lora_te_check_runs_its_cpu_side_without_transformer_engine(tmp_path):
    """Without TE (this machine) the dry run's lora_te check runs the TE LoRA fine-tune and sees megamft refuse it
    with the clear message; it passes, and says why the comparison did not run."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--dry-run",
            "--out",
            str(out),
            "--only",
            "lora_te",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    check = report["checks"]["lora_te"]
    assert check["status"] == "passed", (check, proc.stdout[-3000:])
    assert check["details"]["transformer_engine"].startswith("not available")
    assert check["details"]["refusal"]["rc"] == 2
    assert "model.attention_backend=te" in check["details"]["refusal"]["command"]

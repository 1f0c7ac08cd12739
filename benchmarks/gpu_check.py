"""Prove a GPU machine runs megamft end to end, in one bounded run with a JSON report.

    python benchmarks/gpu_check.py --out OUTDIR [--dry-run] [--budget SECONDS] [--jobs N]
    python benchmarks/gpu_check.py --summarize OUTDIR      # print the report's summary

Usually started by benchmarks/gpu_check.sh, which installs the wheelhouse first. Checks,
in order, each in subprocesses with timeouts, each reported on its own:

  environment         versions, GPU, megamft and its CUDA sources importable
  pytest_cuda_tests   tests/test_fused_ce.py and test_attention's flash varlen test (skipped without a GPU);
                      on a GPU no CUDA-related test may be skipped
  train_loss_modes    `python -m megamft train`, a small Llama in bf16 at TP=1, every loss
                      mode, unfused and with loss.fused_cross_entropy (all modes but focal)
  checkpoint_resume   a run saving at half-way vs resuming from that checkpoint: the same losses
  lora                LoRA from that checkpoint, adapter-only saves
  lora_te             the same LoRA fine-tune on Transformer Engine's spec (norms apart, adapters on TE's
                      linears): its losses against the lora check's local spec; without TE, the clear refusal
                      (dry run) or not run (GPU)
  hf_export           megamft-convert megatron-to-hf of both, loaded with transformers:
                      no missing or unexpected keys, logits equal megamft's own forward
  fused_ce_benchmark  benchmarks/fused_ce.py: fused kernels vs unfused torch, time and memory

OUTDIR/gpu_check.json is rewritten after every check (and every training run), so a kill
leaves a report; work files and logs go to OUTDIR/work. --dry-run runs the same on the CPU
with a tiny model and fewer loss modes (a test runs it). Exit status 0 when every check passed.

This file is the command line; the checks live in benchmarks/gpu_checks/, one module each.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run as a script: its folder holds the gpu_checks package. Added explicitly, since with
# PYTHONSAFEPATH=1 (gpu_check.sh sets it when megamft is installed from a wheel) Python does not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_checks.driver import run  # noqa: E402
from gpu_checks.environment import probe  # noqa: E402
from gpu_checks.export_check import compare_export  # noqa: E402
from gpu_checks.profiles import CHECKS, DRY, GPU  # noqa: E402 - tests read CHECKS and DRY here
from gpu_checks.report import summarize  # noqa: E402


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_probe"]:
        probe()
        return 0
    if argv[:1] == ["_compare_export"]:
        compare_export(argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="report folder (gpu_check.json, work/)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
        help="CPU mode: tiny model, fewer loss modes (also GPU_CHECK_DRY_RUN=1)",
    )
    parser.add_argument(
        "--budget", type=float, help="seconds for all checks (default 420 GPU, 280 dry run)"
    )
    parser.add_argument(
        "--jobs", type=int, help="loss-mode training runs at once (default 3 GPU, 1 dry run)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=CHECKS, help="run these checks only (environment always runs)"
    )
    parser.add_argument(
        "--summarize", type=Path, metavar="OUTDIR", help="print the summary of a report and exit"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    if not args.out:
        parser.error("--out is required")
    profile = DRY if args.dry_run else GPU
    budget = (
        args.budget
        if args.budget is not None
        else float(os.environ.get("GPU_CHECK_BUDGET", profile.budget_s))
    )
    return run(args.out, profile, budget, args.dry_run, args.jobs or profile.jobs, args.only)


if __name__ == "__main__":
    sys.exit(main())

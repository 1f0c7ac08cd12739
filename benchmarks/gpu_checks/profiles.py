"""What a run checks and how long it may take: the GPU profile and the CPU dry run."""

from __future__ import annotations

from dataclasses import dataclass

LOSS_MODES = ("token", "sample", "task_token", "task_sample", "focal", "coba", "famo")
CHECKS = (
    "environment",
    "pytest_cuda_tests",
    "train_loss_modes",
    "checkpoint_resume",
    "lora",
    "lora_te",
    "hf_export",
    "fused_ce_benchmark",
)


@dataclass(frozen=True)
class Profile:
    """What a run checks and how long it may take."""

    name: str
    config: dict  # the training config every run starts from
    budget_s: float  # whole run
    caps: dict  # seconds per check
    run_timeout_s: float  # one training subprocess
    jobs: int  # loss-mode runs at once
    modes: tuple  # (loss mode, fused) pairs for train_loss_modes
    pytest_args: tuple
    bench_args: tuple
    fused_rel_tol: float  # step-1 loss, fused vs unfused
    resume_rel_tol: float  # resumed vs uninterrupted losses (beyond the log's rounding)
    export_tol: float  # max |logit diff| / max(1, max |logit|), full model
    export_lora_tol: float  # the same with LoRA adapters merged into bf16 weights
    lora_te_step1_tol: (
        float  # TE LoRA spec vs local spec: step-1 loss, relative (grad norm: twice this)
    )
    lora_te_curve_tol: float  # the same for the later steps' losses
    omp_threads: str
    max_syncs_per_step: (
        int  # device-to-host synchronizations a training step may make (a few, not per layer)
    )


def _train_config(model: dict, data: dict, train: dict) -> dict:
    return {
        "model": model,
        "parallel": {"tensor_model_parallel_size": 1},
        "data": data,
        "train": {
            "lr_warmup_steps": 1,
            "log_interval": 1,
            "train_steps": 4,
            "precision": "bf16",
            **train,
        },
        "loss": {"coba_update_interval": 2},  # CoBa measures validation losses within the run
        "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4, "weight_decay": 0.01, "clip_grad": 1.0},
        "checkpoint": {"save_dir": None},
    }


# The two profiles share a shape because they fill the same dataclass: they are data, not logic.
GPU = Profile(
    name="gpu",
    config=_train_config(
        {
            "num_layers": 4,
            "hidden_size": 256,
            "ffn_hidden_size": 704,
            "num_attention_heads": 4,
            "num_query_groups": 2,
        },
        {"seq_length": 512, "max_samples_per_task": 200, "valid_samples_per_task": 8},
        {"micro_batch_size": 4, "global_batch_size": 16},
    ),
    budget_s=420,
    caps={
        "environment": 90,
        "pytest_cuda_tests": 200,
        "train_loss_modes": 200,
        "checkpoint_resume": 100,
        "lora": 60,
        "lora_te": 60,
        "hf_export": 90,
        "fused_ce_benchmark": 90,
    },
    run_timeout_s=150,
    jobs=3,
    modes=tuple((m, False) for m in LOSS_MODES)
    + tuple((m, True) for m in LOSS_MODES if m != "focal"),
    pytest_args=(),
    bench_args=(
        "--tokens",
        "8192",
        "--vocab",
        "32000",
        "152064",
        "--dtype",
        "bf16",
        "--repeats",
        "10",
    ),
    fused_rel_tol=2e-2,
    resume_rel_tol=2e-3,
    export_tol=2e-3,
    export_lora_tol=2e-2,
    # bf16 GEMMs in other kernels (TE's vs torch's) and TE's fused attention: the fused-CE comparison's 2e-2
    # on step 1, where weights and adapters are the same; the updates that follow compound the rounding
    lora_te_step1_tol=2e-2,
    lora_te_curve_tol=5e-2,
    omp_threads="2",
    max_syncs_per_step=8,
)

DRY = Profile(
    name="dry-run",
    config=_train_config(
        {
            "num_layers": 2,
            "hidden_size": 32,
            "ffn_hidden_size": 64,
            "num_attention_heads": 4,
            "num_query_groups": 2,
        },
        {"seq_length": 128, "max_samples_per_task": 16, "valid_samples_per_task": 2},
        {"micro_batch_size": 2, "global_batch_size": 4},
    ),
    budget_s=280,
    caps={
        "environment": 60,
        "pytest_cuda_tests": 90,
        "train_loss_modes": 100,
        "checkpoint_resume": 90,
        "lora": 50,
        "lora_te": 60,
        "hf_export": 90,
        "fused_ce_benchmark": 45,
    },
    run_timeout_s=75,
    jobs=1,
    modes=(("task_token", False), ("coba", False), ("task_token", True)),
    # the CPU-runnable tests plus the CUDA ones, which are collected and skipped here
    pytest_args=("-k", "torch_path or gpu or cuda"),
    bench_args=("--tokens", "256", "--vocab", "1000", "--dtype", "fp32", "--repeats", "2"),
    fused_rel_tol=2e-2,
    resume_rel_tol=0.0,
    export_tol=1e-3,
    export_lora_tol=2e-2,
    lora_te_step1_tol=2e-2,
    lora_te_curve_tol=5e-2,
    omp_threads="1",
    max_syncs_per_step=8,
)

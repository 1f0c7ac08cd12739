"""The `megamft` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

from megamft.entry_point import ArgumentParser, run_command
from megamft.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="megamft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (under torchrun for several processes)")
    train.add_argument("--config", action="append", help="YAML config file (repeat to layer files)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    reference = commands.add_parser(
        "reference",
        help="compute and store a dpo/rpo run's reference log-probabilities, then exit",
        description="Compute the reference log-probabilities that `megamft train` of the same config "
        "would compute at its first start (from loss.reference_dir's checkpoint, else the starting "
        "weights), at the config's parallel layout (under torchrun for several processes), and store "
        "them in checkpoint.save_dir; that train reads them instead of computing them.",
    )
    reference.add_argument(
        "--config", action="append", help="YAML config file (repeat to layer files)"
    )
    reference.add_argument("overrides", nargs="*", help="section.key=value overrides")
    check = commands.add_parser("check", help="validate a config for a world size, run nothing")
    check.add_argument("--config", action="append", help="YAML config file (repeat to layer files)")
    check.add_argument("--world-size", type=int, required=True, help="processes it will run on")
    check.add_argument("overrides", nargs="*", help="section.key=value overrides")
    commands.add_parser(
        "launch",
        help="torchrun (same arguments) that turns SIGTERM/SIGUSR1 into a save and a clean exit",
        description="megamft launch [torchrun options] -m megamft train --config CONFIG.yaml ...",
    )
    kernels = commands.add_parser(
        "build-kernels",
        help="build the fused cross-entropy CUDA kernels now (for an image, or before training)",
        description="Build (or find built) the fused cross-entropy CUDA kernels for this machine's torch, CUDA and "
        "TORCH_CUDA_ARCH_LIST (else its GPUs), and print where they are.",
    )
    kernels.add_argument(
        "--build-dir",
        help="kernels root folder (default: $MEGAMFT_KERNELS_DIR, else "
        "$TORCH_EXTENSIONS_DIR/megamft, else ~/.cache/megamft/kernels); point training at it "
        "with MEGAMFT_KERNELS_DIR",
    )
    kernels.add_argument("--verbose", action="store_true", help="show the compiler's output")
    evaluation = commands.add_parser("eval", help="evaluate a model").add_subparsers(
        dest="benchmark", required=True
    )
    from megamft.eval.cli import add_humaneval_arguments

    add_humaneval_arguments(
        evaluation.add_parser("humaneval", help="HumanEval pass@k, sandboxed execution")
    )
    return parser


def _print_summary(result) -> None:
    if result.preempted:
        print(
            f"\npreempted: saved {result.last_checkpoint}; resume with checkpoint.load_dir=<save_dir>"
        )
        return
    before, after = result.valid_before, result.valid_after
    _print_skips(result)
    _print_best(result)
    if before is None or after is None:
        print("\nno validation set (data.valid_samples_per_task=0)")
        return
    print("\nvalidation loss per task (before -> after fine-tuning):")
    for task in before.task_loss:
        print(f"  {task:<20} {_task_loss(before, task)} -> {_task_loss(after, task)}")
    print(f"  {'all tasks':<20} {before.loss:7.3f} -> {after.loss:7.3f}")
    _print_preference(before, after)
    if result.last_checkpoint:
        print(f"checkpoint: {result.last_checkpoint}")


def _print_preference(before, after) -> None:
    """Preference objectives: each task's held-out preference accuracy, before -> after."""
    if not before.preference:
        return
    print("held-out preference accuracy per task (before -> after):")
    accuracy = "rewards/accuracy"
    for task, value in before.preference[accuracy].items():
        print(f"  {task:<20} {_figure(value)} -> {_figure(after.preference[accuracy][task])}")


def _task_loss(stats, task: str) -> str:
    """A task's validation loss, or 'absent' where its rows hold no learned token (a nan there would read
    like a divergence; a present task's nan is still shown)."""
    return f"{'absent':>7}" if not stats.task_tokens.get(task) else f"{stats.task_loss[task]:7.3f}"


def _figure(value: float) -> str:
    """A task's preference accuracy, or 'absent' where it held no held-out pair (nan)."""
    return f"{'absent':>7}" if math.isnan(value) else f"{value:7.3f}"


def _print_best(result) -> None:
    """Model selection: the best measurement and the checkpoint kept for it (named `<save_dir>/best` too)."""
    best = result.best
    if result.stopped_early and best:
        print(
            f"\nstopped early: {best['metric']} stopped improving (train.early_stopping_patience)"
        )
    if not best:
        return
    where = (
        f": {best['checkpoint']} (also <save_dir>/best)"
        if best["checkpoint"]
        else " (no checkpoint kept for it: set checkpoint.keep_best)"
    )
    print(f"best by {best['metric']}: {best['score']:.4g} at step {best['step']}{where}")


def _print_fast_settings(cfg) -> None:
    """What this machine would turn on (megatron-core's own view of CUDA, Transformer Engine and apex)."""
    from megamft.model.fast_settings import fast_settings, machine_for
    from megamft.model.spec import attention_backend_for
    from megamft.platform.device import detect

    runtime = detect()
    backend = attention_backend_for(
        cfg, runtime.transformer_engine, runtime.transformer_engine_problem
    )
    where = "CUDA" if runtime.cuda else "no CUDA"
    print(
        f"fast settings on this machine ({where}; Transformer Engine: {'yes' if runtime.transformer_engine else 'no'}; "
        f"attention backend: {backend}):"
    )
    for setting in fast_settings(
        cfg, machine_for(runtime.cuda, runtime.transformer_engine, backend)
    ):
        print(f"  {setting.describe()}")


def _print_skips(result) -> None:
    if result.loss_scale_skips:
        print(f"steps skipped by the fp16 loss scaler: {result.loss_scale_skips}")
    if result.skipped_steps:
        print(f"steps skipped for a non-finite loss or gradient: {result.skipped_steps}")


def _build_kernels(root: str | None, verbose: bool) -> int:
    """`megamft build-kernels`: 0 and the kernels' folder, or 1 and what is missing (or the build's errors)."""
    from megamft.loss.fused_ce_build import build_extension, failure_reason

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.monotonic()
    try:
        module = build_extension(verbose=verbose, root=root)
    except Exception as exc:  # noqa: BLE001 - what is missing or the compiler's errors, not a traceback
        print(f"megamft build-kernels: {failure_reason(exc)}", file=sys.stderr)
        return 1
    folder = os.path.dirname(module.__file__)
    print(f"fused cross-entropy kernels ready in {folder} ({time.monotonic() - started:.0f} s)")
    if root:
        print(f"train with MEGAMFT_KERNELS_DIR={os.path.abspath(root)} to use them")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"] and not {"-h", "--help"} & set(argv[1:2]):
        from megamft.platform.launcher import (
            main as launch,  # torchrun's options pass through unparsed
        )

        return launch(argv[1:])
    return run_command("megamft", lambda: _run(argv))


def _run(argv: list[str]) -> int:
    from megamft.config import load_config, validate
    from megamft.platform.device import broken_transformer_engine_message
    from megamft.platform.distributed import set_device_max_connections, world_size_from_env

    args = _parser().parse_args(argv)
    broken = broken_transformer_engine_message()
    if broken:  # before anything imports megatron-core, which would stop on it with a traceback
        raise UserError(broken)
    if args.command == "build-kernels":
        return _build_kernels(args.build_dir, args.verbose)
    if args.command == "eval":
        from megamft.eval.cli import run_humaneval

        return run_humaneval(args)
    cfg = load_config(args.config, args.overrides)
    world_size = args.world_size if args.command == "check" else world_size_from_env()
    validate(cfg, world_size)
    if args.command == "check":
        print(f"{', '.join(args.config or ['default config'])}: valid for world size {world_size}")
        _print_fast_settings(cfg)
        return 0
    _configure_logging()
    if args.command == "reference":
        return _compute_reference(cfg)
    set_device_max_connections(
        cfg
    )  # before any import that may start CUDA; initialize warns if needed
    from megamft.training.preemption import PreemptionWatch

    watch = PreemptionWatch(
        cfg.checkpoint.save_on_signal
    )  # before the slow imports: no signal is lost
    from megamft.training.loop import run  # heavy imports only once the config is valid

    result = run(cfg, watch)
    from megamft.platform.distributed import is_rank_zero_after_run

    if is_rank_zero_after_run():
        _print_summary(result)
    return 0


def _compute_reference(cfg) -> int:
    """`megamft reference`: the table stored, its path printed (rank 0)."""
    from megamft.platform.distributed import is_rank_zero_after_run, set_device_max_connections

    set_device_max_connections(cfg)
    from megamft.training.loop import compute_reference

    path = compute_reference(cfg)
    if is_rank_zero_after_run():
        print(f"reference log-probabilities: {path}")
    return 0


def _configure_logging() -> None:
    # MEGAMFT_LOG_LEVEL=DEBUG adds per-step detail (e.g. device synchronizations under the emulation).
    level = os.environ.get("MEGAMFT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter

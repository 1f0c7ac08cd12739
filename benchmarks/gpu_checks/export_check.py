"""megamft-convert megatron-to-hf of the full and LoRA checkpoints, compared with transformers' forward."""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

from .context import Context
from .process import ENTRY_SCRIPT, last_error, run_cmd, tail
from .report import json_safe, say
from .training_runs import expected_steps, latest_iteration, train


def check_export(ctx: Context, rec: dict) -> list:
    details = rec["details"]
    problems = []
    if ctx.full_checkpoint is None:  # checkpoint_resume failed: make a checkpoint of our own
        folder = ctx.work / "ckpt_export"
        shutil.rmtree(folder, ignore_errors=True)
        run = train(ctx, "export_source", [f"checkpoint.save_dir={folder}"], expected_steps(ctx))
        details["source_run"] = run
        if run["rc"] == 0 and latest_iteration(folder):
            ctx.full_checkpoint = folder
        else:
            return run["problems"] + ["no checkpoint to export"]
    sources = [("full", ctx.full_checkpoint, ctx.profile.export_tol)]
    if ctx.lora_checkpoint:
        sources.append(("lora", ctx.lora_checkpoint, ctx.profile.export_lora_tol))
    else:
        details["lora"] = "not exported: the lora check left no checkpoint"
    for label, checkpoint, tol in sources:
        entry = details[label] = {}
        problems += _export_and_compare(ctx, label, checkpoint, tol, entry)
    return problems


def _export_and_compare(
    ctx: Context, label: str, checkpoint: Path, tol: float, entry: dict
) -> list:
    """Export one checkpoint and compare its logits in transformers with megamft's; fills `entry`."""
    hf = ctx.work / f"hf_{label}"
    shutil.rmtree(hf, ignore_errors=True)
    say(f"  export {label}: megamft-convert megatron-to-hf")
    export = run_cmd(
        [
            ctx.python,
            "tools/convert_checkpoint.py",
            "megatron-to-hf",
            "--checkpoint",
            checkpoint,
            "--out",
            hf,
        ],
        ctx.work / "logs" / f"export_{label}.log",
        ctx.timeout(120),
        ctx.env(),
    )
    entry["export"] = export.brief()
    if export.rc != 0:
        entry["output_tail"] = tail(export.output)
        return [f"export {label}: exit {export.rc}: {last_error(export.output)}"]
    entry["files"] = sorted(p.name for p in hf.iterdir()) if hf.is_dir() else []
    if "config.json" not in entry["files"] or not any(
        f.endswith(".safetensors") for f in entry["files"]
    ):
        return [f"export {label}: no config.json or safetensors in {hf}"]
    say(f"  export {label}: transformers vs megamft logits")
    result_path = ctx.work / f"compare_{label}.json"
    result_path.unlink(missing_ok=True)
    compare = run_cmd(
        [
            ctx.python,
            str(ENTRY_SCRIPT),
            "_compare_export",
            "--checkpoint",
            checkpoint,
            "--hf",
            hf,
            "--result",
            result_path,
        ],
        ctx.work / "logs" / f"compare_{label}.log",
        ctx.timeout(120),
        ctx.env(),
    )
    entry["compare"] = compare.brief()
    if not result_path.is_file():
        entry["output_tail"] = tail(compare.output)
        return [f"compare {label}: exit {compare.rc}: {last_error(compare.output)}"]
    found = json.loads(result_path.read_text())
    entry.update(found)
    if "error" in found:
        return [f"compare {label}: {found['error']}"]
    problems = []
    if found.get("full_logits_error"):
        problems.append(
            f"export {label}: megamft.model.inference.full_logits failed on this device "
            f"({found['full_logits_error']}); compared through a plain forward instead"
        )
    keys = {k: v for k, v in found["loading_info"].items() if v}
    if keys:
        problems.append(f"export {label}: transformers reports {keys}")
    allowed = tol * max(1.0, found["max_abs_logit"])
    entry["allowed_max_abs_diff"] = allowed
    if not found["max_abs_diff"] <= allowed:
        problems.append(
            f"export {label}: logits differ from megamft's by {found['max_abs_diff']:.3g} "
            f"(allowed {allowed:.3g})"
        )
    return problems


def compare_export(argv: list) -> None:
    """Child process (`gpu_check.py _compare_export`): megamft's forward of a checkpoint vs transformers'
    forward of its export."""
    parser = argparse.ArgumentParser(prog="gpu_check.py _compare_export")
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--hf", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    result = {}
    try:
        result = _compare_export_logits(args.checkpoint, args.hf)
    except Exception:  # noqa: BLE001 - the parent reports it
        result["error"] = tail(traceback.format_exc(), 3000)
    args.result.write_text(json.dumps(json_safe(result), indent=2))


def _megamft_logits(cfg, checkpoint: Path, tokens, device: str) -> tuple:
    """(logits in fp32 on the host, LoRA parameters in the model, full_logits' error or None)."""
    import torch

    from megamft.checkpoint import dist_checkpoint
    from megamft.model.inference import full_logits
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state

    vocab, inference_error = cfg.model.vocab_size, None
    runtime = distributed.initialize(cfg)
    try:
        state = build_training_state(cfg, runtime, vocab)
        dist_checkpoint.load(state, str(checkpoint), cfg, load_optimizer=False)
        adapters = sum(1 for n, _ in state.chunks[0].named_parameters() if "lora_" in n)
        try:
            ours = full_logits(state.chunks, tokens.to(device)).float().cpu()
        except Exception:  # noqa: BLE001 - reported; compare through a plain forward instead
            inference_error = traceback.format_exc().strip().splitlines()[-1]
            model = state.chunks[0]
            model.eval()
            positions = torch.arange(tokens.shape[1], device=device).expand(tokens.shape)
            with torch.no_grad():
                ours = model(tokens.to(device), positions, None).float().cpu()
    finally:
        distributed.shutdown()
    return ours, adapters, inference_error


def _compare_export_logits(checkpoint: Path, hf: Path) -> dict:
    import torch

    from megamft.checkpoint import dist_checkpoint
    from megamft.config import from_dict

    iteration = dist_checkpoint.latest_iteration(checkpoint)
    saved = json.loads(
        (dist_checkpoint.complete_dir(checkpoint, iteration) / "megamft_config.json").read_text()
    )
    cfg = from_dict(saved)
    # Both sides in fp32 from the same (bf16-trained) weights; a world of one process.
    cfg.train.precision = "fp32"
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, 2
    cfg.checkpoint.load_dir = cfg.checkpoint.save_dir = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = cfg.model.vocab_size
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    began = time.monotonic()
    ours, adapters, inference_error = _megamft_logits(cfg, checkpoint, tokens, device)
    megamft_seconds = time.monotonic() - began

    import transformers

    began = time.monotonic()
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            hf, dtype=torch.float32, output_loading_info=True
        )
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            hf, torch_dtype=torch.float32, output_loading_info=True
        )
    model = model.to(device).eval()
    with torch.no_grad():
        theirs = model(tokens.to(device)).logits.float().cpu()
    hf_vocab = theirs.shape[-1]
    diff = (ours[..., :hf_vocab] - theirs).abs()
    return {
        "device": device,
        "iteration": iteration,
        "tokens": list(tokens.shape),
        "megamft_padded_vocab": ours.shape[-1],
        "hf_vocab": hf_vocab,
        "lora_parameters_in_megamft_model": adapters,
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": float(theirs.abs().max()),
        "argmax_agreement": float(
            (ours[..., :hf_vocab].argmax(-1) == theirs.argmax(-1)).float().mean()
        ),
        "megamft_seconds": round(megamft_seconds, 1),
        "transformers_seconds": round(time.monotonic() - began, 1),
        "transformers_version": transformers.__version__,
        "architecture": type(model).__name__,
        **({"full_logits_error": inference_error} if inference_error else {}),
    }

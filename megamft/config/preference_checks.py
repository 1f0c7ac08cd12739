"""Which loss settings combine with the preference objectives (loss.objective other than sft)."""

from __future__ import annotations

import json
from pathlib import Path

from megamft.config.schema import MegamftConfig

_BALANCERS = ("focal", "coba", "famo")


def packed_pairs_on_te(objective: str) -> str:
    """Why data.mode=pack is refused for pairs with Transformer Engine's attention (validation names the
    explicit backend; the run, `auto` resolved to te)."""
    return (
        f"data.mode=pack with loss.objective={objective} packs a pair micro-batch into several rows, "
        "which Transformer Engine's 'thd' packing does not take yet: use "
        "model.attention_backend=torch (or local), or data.mode=pad"
    )


def preference_problems(cfg: MegamftConfig) -> list[str]:
    """One line per setting that has no meaning with the configured objective, naming the key."""
    loss = cfg.loss
    problems = _data_kind_problems(cfg)
    if loss.objective == "sft":
        return problems
    name = f"loss.objective={loss.objective}"
    if loss.mode in _BALANCERS:
        problems.append(
            f"loss.mode={loss.mode} balances per-task token losses of sft and does not apply to "
            f"{name}; use token (the mean over pairs) or task_token (per-task means, loss.task_weights)"
        )
    if loss.normalization != "global_batch":
        problems.append(
            f"loss.normalization={loss.normalization} does not apply to {name}: pairs are counted over "
            "the global batch; remove it"
        )
    if loss.objective == "orpo" and loss.label_smoothing:
        problems.append(
            "loss.label_smoothing applies to dpo, rpo and simpo, not to loss.objective=orpo; remove it"
        )
    for key in ("micro_batch_size", "global_batch_size"):
        value = getattr(cfg.train, key)
        if value % 2:
            problems.append(
                f"train.{key}={value} counts sequences, two per preference pair (its chosen and "
                f"rejected answers, never split): make it even with {name}"
            )
    if loss.reference_dir and loss.objective not in ("dpo", "rpo"):
        problems.append(
            f"loss.reference_dir applies to dpo and rpo; {name} has no reference: remove it"
        )
    elif loss.reference_dir and not cfg.checkpoint.load_dir:
        problems.append(
            "loss.reference_dir needs checkpoint.load_dir: the weights training starts from are "
            "loaded after the reference is computed"
        )
    if cfg.data.mode == "pack" and cfg.model.attention_backend == "te":
        problems.append(packed_pairs_on_te(loss.objective))
    if cfg.parallel.context_parallel_size > 1:
        problems.append(
            f"{name} needs whole sequences on one rank: parallel.context_parallel_size must be 1 "
            "(per-sequence log-probabilities over CP ranks are not implemented)"
        )
    return problems


def _data_kind_problems(cfg: MegamftConfig) -> list[str]:
    """Preference objectives read preference tasks only (manifest "preference": true), sft none of them."""
    preference = cfg.loss.objective != "sft"
    if cfg.data.source != "indexed":
        return (
            [
                f"loss.objective={cfg.loss.objective} needs preference pairs: data.source=indexed, a "
                "megamft-preprocess folder of chosen/rejected records"
            ]
            if preference
            else []
        )
    manifest = Path(cfg.data.path or "") / "manifest.json"
    try:
        tasks = json.loads(manifest.read_text())["tasks"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # validation's data checks name a missing or unreadable manifest
    wrong = [
        t.get("name")
        for t in tasks
        if isinstance(t, dict) and bool(t.get("preference")) != preference
    ]
    if not wrong:
        return []
    if preference:
        return [
            f"loss.objective={cfg.loss.objective} needs preference pairs, but task(s) {wrong} of "
            f"data.path={cfg.data.path} are not; preprocess chosen/rejected records for them"
        ]
    return [
        f"task(s) {wrong} of data.path={cfg.data.path} hold preference pairs; set loss.objective to dpo, rpo, "
        "orpo or simpo (sft would learn the rejected answers too)"
    ]

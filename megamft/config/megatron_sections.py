"""Checks of the sections megatron-core types itself (``optimizer``, ``ddp``, ``transformer``).

Their keys and types are megatron's dataclasses' (config.loading); what those
dataclasses do not say is which values make sense. Megatron finds some of them
only when the model or the optimizer is built, after the process group started
(an assertion in its LR scheduler or grad scaler, a ValueError in
TransformerConfig.__post_init__), and others never (a negative weight decay, a
dropout of 2). Here are the keys users set most, with their allowed values as
megatron's code uses them (optimizer/optimizer_config.py, optimizer/grad_scaler.py,
optimizer_param_scheduler.py, transformer/transformer_config.py); every float
given in these sections must be finite.
"""

from __future__ import annotations

import math

from megamft.config.ranges import Range

_POSITIVE = Range(0, low_open=True)
_NON_NEGATIVE = Range(0)
_BETA = Range(0, 1, high_open=True)

MEGATRON_CHECKS: dict[str, dict[str, Range | tuple[str, ...]]] = {
    "optimizer": {
        "optimizer": ("adam", "sgd"),  # what get_megatron_optimizer builds
        "lr": _NON_NEGATIVE,
        "min_lr": _NON_NEGATIVE,
        "decoupled_lr": _NON_NEGATIVE,
        "decoupled_min_lr": _NON_NEGATIVE,
        "weight_decay": _NON_NEGATIVE,
        "clip_grad": _NON_NEGATIVE,  # clip_grad 0: no clipping
        "adam_beta1": _BETA,
        "adam_beta2": _BETA,
        "adam_eps": _POSITIVE,
        "sgd_momentum": _BETA,
        "loss_scale": _POSITIVE,
        "initial_loss_scale": _POSITIVE,
        "min_loss_scale": _POSITIVE,
        "loss_scale_window": Range(1),
        "hysteresis": Range(1),
        "optimizer_offload_fraction": Range(0, 1),
    },
    "ddp": {
        "bucket_size": Range(1),
        "num_distributed_optimizer_instances": Range(1),
    },
    "transformer": {
        "hidden_dropout": Range(0, 1),
        "attention_dropout": Range(0, 1),
        "recompute_num_layers": Range(1),
        "embedding_init_method_std": _POSITIVE,
        "moe_expert_capacity_factor": _POSITIVE,
        "moe_router_topk_scaling_factor": _POSITIVE,
        "moe_input_jitter_eps": _NON_NEGATIVE,
        "moe_router_bias_update_rate": _NON_NEGATIVE,
        "cpu_offloading_num_layers": _NON_NEGATIVE,
    },
}


def megatron_problems(
    sections: dict[str, dict], num_layers: int, pipeline_stages: int
) -> list[str]:
    """Every problem of the values in the pass-through sections (section name -> its dict)."""
    problems = []
    for section, values in sections.items():
        checks = MEGATRON_CHECKS.get(section, {})
        for key, value in values.items():
            problems += _value_problems(f"{section}.{key}", value, checks.get(key))
    if problems:
        return problems
    return _optimizer_relations(sections.get("optimizer", {})) + _recompute_problems(
        sections.get("transformer", {}), num_layers, pipeline_stages
    )


def _value_problems(key: str, value, check) -> list[str]:
    if isinstance(check, tuple):
        if value is not None and value not in check:
            return [f"{key} must be one of {list(check)}, got {value!r}"]
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        problem = check.problem(key, item) if isinstance(check, Range) else None
        if problem:
            return [problem]
        if isinstance(item, float) and not math.isfinite(item):
            return [f"{key} must be a finite number, got {value!r}"]
    return []


def _optimizer_relations(opt: dict) -> list[str]:
    problems = []
    if "lr" in opt and opt["lr"] is None:
        problems.append(
            "optimizer.lr must be set (a finite number >= 0); megamft's default is 1e-3"
        )
    for low, high in (("min_lr", "lr"), ("decoupled_min_lr", "decoupled_lr")):
        if opt.get(low) is not None and opt.get(high) is not None and opt[low] > opt[high]:
            problems.append(
                f"optimizer.{low} ({opt[low]}) must not exceed optimizer.{high} ({opt[high]}): "
                "the schedule decays from the second down to the first"
            )
    floor, start = opt.get("min_loss_scale", 1.0), opt.get("initial_loss_scale")
    if start is not None and floor > start:
        problems.append(
            f"optimizer.min_loss_scale ({floor}) must not exceed optimizer.initial_loss_scale ({start})"
        )
    return problems


def _recompute_problems(transformer: dict, num_layers: int, pipeline_stages: int) -> list[str]:
    """transformer.recompute_*: the combinations TransformerConfig accepts, said before the model is built."""
    granularity = transformer.get("recompute_granularity")
    method, layers = transformer.get("recompute_method"), transformer.get("recompute_num_layers")
    if granularity is None:
        unused = [
            f"transformer.{k}"
            for k in ("recompute_method", "recompute_num_layers")
            if transformer.get(k) is not None
        ]
        return (
            [
                f"{' and '.join(unused)} {'do' if len(unused) > 1 else 'does'} nothing without "
                "transformer.recompute_granularity=full; set it, or remove them"
            ]
            if unused
            else []
        )
    if granularity == "selective":
        if layers is not None:
            return [
                "transformer.recompute_granularity=selective takes no transformer.recompute_num_layers "
                "(it recomputes the chosen modules of every layer); remove it"
            ]
        return []
    per_stage = max(num_layers // max(pipeline_stages, 1), 1)
    if method is None or layers is None:
        return [
            f"transformer.recompute_granularity=full needs transformer.recompute_method (uniform or block) and "
            f"transformer.recompute_num_layers (1 to {per_stage}, the layers of one pipeline stage)"
        ]
    if layers > per_stage:
        return [
            f"transformer.recompute_num_layers ({layers}) exceeds the {per_stage} layer(s) of one pipeline "
            "stage (model.num_layers / parallel.pipeline_model_parallel_size)"
        ]
    return []

"""Every config value checked before any process group starts: first each value against the range its
field declares (megamft.config.ranges) and the pass-through sections' values (megatron_sections), then
cross-section rules (divisibility, world size, data, LoRA)."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

from megamft.config.eval_checks import eval_problems, selection_problems
from megamft.config.megatron_sections import megatron_problems
from megamft.config.preference_checks import preference_problems
from megamft.config.ranges import leaves, values_at
from megamft.config.schema import LORA_LINEARS, LORA_TARGETS, ConfigError, MegamftConfig
from megamft.config.task_weights import (
    loss_weight_problems,
    manifest_task_names,
    sampling_weight_problems,
)


def data_parallel_size(cfg: MegamftConfig, world_size: int) -> int:
    """DP replicas for this world size (assumes ``validate`` passed)."""
    p = cfg.parallel
    return world_size // (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    )


def validate(cfg: MegamftConfig, world_size: int) -> None:
    """Check every value, then the cross-section rules; raise one ConfigError listing every problem."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    p = cfg.parallel
    problems = range_problems(cfg) + megatron_problems(
        {"optimizer": cfg.optimizer, "ddp": cfg.ddp, "transformer": cfg.transformer},
        cfg.model.num_layers,
        p.pipeline_model_parallel_size,
    )
    if problems:  # the rules below assume every value in its range (no zero sizes to divide by)
        raise ConfigError(problems)
    problems = _model_problems(cfg) + _parallel_problems(cfg, world_size)
    problems += _batch_problems(cfg, world_size) + _data_problems(cfg) + _lora_problems(cfg)
    problems += _expert_problems(cfg, world_size) + _overlap_problems(cfg)
    problems += eval_problems(cfg) + selection_problems(cfg) + preference_problems(cfg)
    if problems:
        raise ConfigError(problems)


def range_problems(cfg: MegamftConfig) -> list[str]:
    """Every value of megamft's own sections checked against the Range its field declares."""
    problems = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue  # a pass-through section of megatron's: megatron_problems
        hints = typing.get_type_hints(type(values), include_extras=True)
        for field in dataclasses.fields(values):
            problems += field_range_problems(
                f"{section.name}.{field.name}", getattr(values, field.name), hints[field.name]
            )
    return problems


def field_range_problems(key: str, value, annotation) -> list[str]:
    """One field's value against the ranges in its annotation: one message for the value, or one for all
    the entries of a mapping or list that are out of range."""
    problems = []
    for where, _, declared in leaves(annotation):
        if declared is None:
            continue
        bad = {
            name: item
            for name, item in values_at(value, where, key)
            if declared.problem(name, item)
        }
        if not bad:
            continue
        if not where:
            problems.append(declared.problem(key, value))
        else:
            entries = {name[len(key) :].lstrip("."): item for name, item in bad.items()}
            finite = not all(math.isfinite(item) for item in entries.values())
            problems.append(
                f"{key} must be {declared.describe(finite)} for each entry, got {entries}"
            )
    return problems


def _overlap_problems(cfg: MegamftConfig) -> list[str]:
    """The parameter all-gather exists only with the distributed optimizer (without it the option would
    silently do nothing); without overlap_grad_reduce megatron keeps one bucket per buffer, so nothing
    would overlap (Megatron-LM refuses that pairing too)."""
    if not cfg.ddp.get("overlap_param_gather"):
        return []
    problems = []
    if not cfg.optimizer.get("use_distributed_optimizer", True):
        problems.append(
            "ddp.overlap_param_gather needs optimizer.use_distributed_optimizer=true "
            "(it overlaps the distributed optimizer's parameter all-gather)"
        )
    if not cfg.ddp.get("overlap_grad_reduce"):
        problems.append(
            "ddp.overlap_param_gather needs ddp.overlap_grad_reduce=true (its buckets are what "
            "the gather overlaps with the forward pass)"
        )
    return problems


def _context_parallel_problems(cfg: MegamftConfig, cp: int, tp: int) -> list[str]:
    """CP splits every sequence into 2 x CP chunks inside Transformer Engine's attention."""
    problems = []
    multiple = 2 * cp * (tp if cfg.parallel.sequence_parallel else 1)
    if cfg.data.seq_length % multiple:
        problems.append(
            f"data.seq_length ({cfg.data.seq_length}) must be divisible by {multiple} "
            "(2 x CP, x TP with sequence parallel) with context parallelism"
        )
    if cfg.data.mode == "dynamic" and cfg.data.pad_to_multiple_of % multiple:
        problems.append(
            f"data.pad_to_multiple_of must be a multiple of {multiple} with context parallelism"
        )
    if cfg.data.mode == "pack":
        problems.append(
            "data.mode=pack is not supported with context parallelism yet; use pad, dynamic or concat"
        )
    if cfg.loss.mode == "focal":
        problems.append(
            "loss.mode=focal needs whole samples' losses on one rank; not with context parallelism"
        )
    return problems


def _lora_problems(cfg: MegamftConfig) -> list[str]:
    lora = cfg.lora
    if lora.save_adapters_only and not (lora.enabled and cfg.checkpoint.load_dir):
        return [
            "lora.save_adapters_only needs lora.enabled=true and checkpoint.load_dir (the base weights, "
            "or an earlier LoRA checkpoint of this run)"
        ]
    unknown = sorted(set(lora.targets) - set(LORA_TARGETS))
    if unknown:
        return [f"lora.targets must name some of {list(LORA_TARGETS)}; unknown: {unknown}"]
    if not lora.enabled:
        return []
    problems = []
    if not 0 <= lora.dropout < 1:
        problems.append(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    present = [path for path in LORA_LINEARS if _has_linear(cfg, path)]
    if not lora.targets:
        problems.append(f"lora.targets must name some of {list(LORA_TARGETS)}; it is empty")
    elif not any(lora.adapted(path) for path in present):
        problems.append(
            f"lora.targets {lora.targets} select no linear of this model (it has "
            f"{', '.join(present)}); use all-linear or some of these"
        )
    experts = any(lora.adapted(p) for p in present if p.startswith("mlp.experts."))
    if (
        experts
        and (cfg.parallel.expert_tensor_parallel_size or cfg.parallel.tensor_model_parallel_size)
        != 1
    ):
        problems.append(
            "LoRA on routed experts (lora.targets) needs parallel.expert_tensor_parallel_size=1: "
            "megatron does not reduce the gradients of adapter halves replicated over expert-TP "
            "ranks; set it, or target shared_experts / attention only"
        )
    if lora.quantize_base and cfg.checkpoint.save_dir and not lora.save_adapters_only:
        problems.append(
            "lora.quantize_base saves with lora.save_adapters_only=true: the base stays in "
            "checkpoint.load_dir at full precision; a full save would hold its dequantized 4-bit copy"
        )
    if lora.quantize_base and cfg.model.attention_backend == "te":
        problems.append(
            "model.attention_backend=te with lora.quantize_base: the NF4 base computes in megatron's "
            "local linears, not Transformer Engine's; use model.attention_backend=torch (or auto)"
        )
    return problems


def _has_linear(cfg: MegamftConfig, path: str) -> bool:
    """Whether the model's layers have the linear at `path` (one of LORA_LINEARS)."""
    m = cfg.model
    if path.startswith("mlp.experts."):
        return bool(m.num_experts)
    if path.startswith("mlp.shared_experts."):
        return bool(m.num_experts and m.moe_shared_expert_intermediate_size)
    return not (path.startswith("mlp.") and m.num_experts)


def _data_problems(cfg: MegamftConfig) -> list[str]:
    d = cfg.data
    problems = []
    if d.source == "indexed" and not d.path:
        problems.append("data.source=indexed needs data.path, a megamft-preprocess output folder")
    if d.source == "indexed" and d.path and not (Path(d.path) / "manifest.json").is_file():
        problems.append(
            f"data.path={d.path} has no manifest.json; run megamft-preprocess --out {d.path} first"
        )
    if d.index_cache and d.source != "indexed":
        problems.append(
            "data.index_cache applies to data.source=indexed (the embedded corpus's index is built in "
            "memory); remove it"
        )
    if d.task_sampling == "weights" and not d.task_sampling_weights:
        problems.append(
            "data.task_sampling=weights needs data.task_sampling_weights, e.g. {code_completion: 2.0}"
        )
    problems += _task_weight_problems(cfg)
    if d.task_sampling_weights and d.task_sampling != "weights":
        problems.append("data.task_sampling_weights is set but data.task_sampling is not 'weights'")
    tp = cfg.parallel.tensor_model_parallel_size
    if d.mode == "dynamic" and cfg.parallel.sequence_parallel and d.pad_to_multiple_of % tp:
        problems.append(
            f"data.pad_to_multiple_of ({d.pad_to_multiple_of}) must be a multiple of "
            f"parallel.tensor_model_parallel_size ({tp}) with sequence parallel"
        )
    return problems


def _task_weight_problems(cfg: MegamftConfig) -> list[str]:
    """Task weights against the data's task names where they are known now (a preprocessed folder's
    manifest); otherwise what needs no names, the rest being checked when the data is read."""
    d = cfg.data
    tasks = manifest_task_names(d.path) if d.source == "indexed" and d.path else None
    if tasks is not None:
        return sampling_weight_problems(d, tasks) + loss_weight_problems(cfg.loss, d, tasks)
    if (
        d.task_sampling == "weights"
        and d.task_sampling_weights
        and not any(d.task_sampling_weights.values())
    ):
        return [
            f"data.task_sampling_weights gives every task weight 0 ({d.task_sampling_weights}; tasks it does "
            "not name weigh 0 too): no sample would be drawn; give at least one a weight > 0"
        ]
    return []


def _model_problems(cfg: MegamftConfig) -> list[str]:
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    groups = m.num_query_groups or m.num_attention_heads
    problems = []
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        problems.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({m.num_attention_heads})"
        )
    if m.num_attention_heads % groups:
        problems.append(
            f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
            f"model.num_query_groups ({groups})"
        )
    if m.num_attention_heads % tp:
        problems.append(
            f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if groups % tp and tp % groups:  # fewer groups than TP: megatron replicates them
        problems.append(
            f"model.num_query_groups ({groups}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp}) or divide it"
        )
    if m.ffn_hidden_size % tp:
        problems.append(
            f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if m.attention_backend in ("torch", "local") and p.context_parallel_size > 1:
        problems.append(
            f"model.attention_backend={m.attention_backend} has no context parallelism; use "
            "model.attention_backend=te (Transformer Engine) with parallel.context_parallel_size > 1"
        )
    if m.sliding_window and cfg.data.seq_length > m.sliding_window and p.context_parallel_size > 1:
        problems.append(
            f"model.sliding_window ({m.sliding_window}) is shorter than data.seq_length ({cfg.data.seq_length}) "
            f"with parallel.context_parallel_size={p.context_parallel_size}: windowed attention under context "
            "parallelism is untested in megamft; use context_parallel_size=1 or sequences up to the window"
        )
    problems += _rope_problems(m) + _layer_feature_problems(cfg) + _mla_and_moe_layer_problems(cfg)
    if cfg.data.seq_length > m.max_position_embeddings:
        problems.append(
            f"data.seq_length ({cfg.data.seq_length}) exceeds "
            f"model.max_position_embeddings ({m.max_position_embeddings})"
        )
    return problems


def _rope_problems(m) -> list[str]:
    if m.rope_scaling_factor is not None and m.rope_scaling_factor <= 0:
        return [f"model.rope_scaling_factor must be > 0 or null, got {m.rope_scaling_factor}"]
    if m.rope_scaling_type == "yarn" and m.rope_scaling_factor:
        return _yarn_problems(m)
    if m.rope_scaling_type != "llama3" or not m.rope_scaling_factor:
        return []
    keys = (
        "rope_llama3_low_freq_factor",
        "rope_llama3_high_freq_factor",
        "rope_llama3_original_max_position_embeddings",
    )
    missing = [f"model.{k}" for k in keys if getattr(m, k) is None]
    if missing:
        return [
            f"model.rope_scaling_type=llama3 needs {', '.join(missing)} (from the model's config.json "
            "rope_parameters; megamft does not assume Llama 3.1's values)"
        ]
    if m.rope_llama3_high_freq_factor <= m.rope_llama3_low_freq_factor:
        return [
            f"model.rope_llama3_high_freq_factor ({m.rope_llama3_high_freq_factor}) must exceed "
            f"model.rope_llama3_low_freq_factor ({m.rope_llama3_low_freq_factor})"
        ]
    return []


def _layer_feature_problems(cfg: MegamftConfig) -> list[str]:
    """Windows per layer, soft-capping, post-sublayer norms: values, and the backends that compute them."""
    m, problems = cfg.model, []
    if m.sliding_window_layers is not None:
        if len(m.sliding_window_layers) != m.num_layers:
            problems.append(
                f"model.sliding_window_layers has {len(m.sliding_window_layers)} entries; "
                f"model.num_layers is {m.num_layers}"
            )
        if not m.sliding_window:
            problems.append("model.sliding_window_layers needs model.sliding_window")
    if m.attention_logit_softcap and m.attention_backend in ("te", "local"):
        problems.append(
            f"model.attention_logit_softcap with model.attention_backend={m.attention_backend}: only the "
            "torch backend computes attention soft-capping; use model.attention_backend=torch (or auto)"
        )
    if m.post_sublayer_norms and m.attention_backend == "te":
        problems.append(
            "model.post_sublayer_norms with model.attention_backend=te: the norms after attention and "
            "MLP are built in the local layer; use model.attention_backend=torch (or auto)"
        )
    if (m.multi_latent_attention or m.moe_first_dense_layers) and m.attention_backend == "te":
        problems.append(
            "model.multi_latent_attention / model.moe_first_dense_layers with model.attention_backend=te: "
            "DeepSeek-V2's layers are built in the local layer; use model.attention_backend=torch (or auto)"
        )
    if m.post_sublayer_norms and m.num_experts:
        problems.append(
            "model.post_sublayer_norms with model.num_experts: no norm after an MoE layer is supported"
        )
    return problems


def _mla_and_moe_layer_problems(cfg: MegamftConfig) -> list[str]:
    """Multi-latent attention's widths over TP, and DeepSeek-V2's MoE layout and routing."""
    m, tp, problems = cfg.model, cfg.parallel.tensor_model_parallel_size, []
    if m.multi_latent_attention:
        latent = m.kv_lora_rank + m.qk_pos_emb_head_dim
        for what, value in (
            ("model.kv_lora_rank + model.qk_pos_emb_head_dim", latent),
            ("model.q_lora_rank", m.q_lora_rank or 0),
        ):
            if tp > 0 and value % tp:  # megatron's local MLA splits its down projections over TP
                problems.append(
                    f"{what} ({value}) must be divisible by parallel.tensor_model_parallel_size ({tp})"
                )
        if not m.rope_yarn_truncate:
            problems.append(
                "model.rope_yarn_truncate=false with model.multi_latent_attention: megatron-core's MLA "
                "rounds YaRN's ramp ends (rope_parameters.truncate true)"
            )
        if m.position_embedding != "rope":
            problems.append("model.multi_latent_attention needs model.position_embedding=rope")
    if cfg.lora.enabled and (m.multi_latent_attention or m.moe_first_dense_layers):
        problems.append(
            "lora.enabled with model.multi_latent_attention or model.moe_first_dense_layers (DeepSeek-V2): "
            "adapters on these layers are not supported; fine-tune the whole model (lora.enabled=false)"
        )
    if m.moe_first_dense_layers and (not m.num_experts or m.moe_first_dense_layers >= m.num_layers):
        problems.append(
            f"model.moe_first_dense_layers ({m.moe_first_dense_layers}) needs model.num_experts and "
            f"fewer than model.num_layers ({m.num_layers})"
        )
    if bool(m.moe_router_num_groups) != bool(m.moe_router_group_topk):
        problems.append(
            "model.moe_router_num_groups and model.moe_router_group_topk are set together"
        )
    elif (
        m.moe_router_num_groups
        and m.num_experts
        and (
            m.num_experts % m.moe_router_num_groups
            or m.moe_router_group_topk > m.moe_router_num_groups
        )
    ):
        problems.append(
            f"model.moe_router_num_groups ({m.moe_router_num_groups}) must divide model.num_experts "
            f"({m.num_experts}) and be at least model.moe_router_group_topk ({m.moe_router_group_topk})"
        )
    return problems


def _yarn_problems(m) -> list[str]:
    problems = []
    if not m.rope_yarn_original_max_position_embeddings:
        problems.append(
            "model.rope_scaling_type=yarn needs model.rope_yarn_original_max_position_embeddings "
            "(the model's rope_parameters.original_max_position_embeddings)"
        )
    explicit = m.rope_yarn_attention_factor is not None and m.rope_yarn_attention_factor != 1.0
    if m.rope_scaling_factor <= 1 and explicit:
        problems.append(
            f"model.rope_scaling_factor ({m.rope_scaling_factor}) must exceed 1 with "
            "model.rope_yarn_attention_factor: megatron-core's YaRN derives the attention factor from "
            "the scaling factor's logarithm"
        )
    return problems


def _parallel_problems(cfg: MegamftConfig, world_size: int) -> list[str]:
    p = cfg.parallel
    problems = []
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    vpp = p.virtual_pipeline_model_parallel_size
    stages = pp * (vpp or 1)
    if cfg.model.num_layers % stages:
        what = f"pipeline_model_parallel_size ({pp})"
        if vpp:
            what += f" x virtual_pipeline_model_parallel_size ({vpp})"
        problems.append(
            f"model.num_layers ({cfg.model.num_layers}) must be divisible by parallel.{what}"
        )
    if vpp is not None and pp < 2:
        problems.append(
            "parallel.virtual_pipeline_model_parallel_size needs "
            f"pipeline_model_parallel_size >= 2 (got PP={pp}, VPP={vpp})"
        )
    if p.sequence_parallel and tp < 2:
        problems.append("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    if p.sequence_parallel and cfg.data.seq_length % tp:
        problems.append(
            f"data.seq_length ({cfg.data.seq_length}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp}) with sequence parallel"
        )
    if cp > 1:
        problems += _context_parallel_problems(cfg, cp, tp)
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}; "
            "change the parallel sizes or the number of processes"
        )
    elif p.data_parallel_size is not None and p.data_parallel_size * model_parallel != world_size:
        problems.append(
            f"world size {world_size} != TP x PP x CP x DP = {tp} x {pp} x {cp} x "
            f"{p.data_parallel_size} (parallel.data_parallel_size)"
        )
    return problems


def _expert_problems(cfg: MegamftConfig, world_size: int) -> list[str]:
    """Mixture of experts: megatron carves EP x ETP out of the ranks of one pipeline stage."""
    m, p = cfg.model, cfg.parallel
    ep, etp = (
        p.expert_model_parallel_size,
        p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
    )
    if m.num_experts is None:
        if ep != 1 or p.expert_tensor_parallel_size is not None:
            return [
                "parallel.expert_model_parallel_size / expert_tensor_parallel_size need a mixture-of-experts "
                "model (model.num_experts)"
            ]
        return []
    problems = []
    if m.moe_router_topk > m.num_experts:
        problems.append(
            f"model.moe_router_topk ({m.moe_router_topk}) exceeds model.num_experts ({m.num_experts})"
        )
    if m.num_experts % ep:
        problems.append(
            f"model.num_experts ({m.num_experts}) must be divisible by "
            f"parallel.expert_model_parallel_size ({ep})"
        )
    expert_ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size
    if expert_ffn % etp:
        problems.append(
            f"model.moe_ffn_hidden_size ({expert_ffn}) must be divisible by the expert tensor "
            f"parallel size ({etp})"
        )
    expert_ranks = etp * ep * p.pipeline_model_parallel_size
    if world_size % expert_ranks:
        problems.append(
            f"world size {world_size} is not divisible by expert TP x EP x PP = {etp} x {ep} x "
            f"{p.pipeline_model_parallel_size}; change parallel.expert_model_parallel_size"
        )
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        problems.append(
            "a mixture-of-experts model with parallel.tensor_model_parallel_size > 1 needs "
            "parallel.sequence_parallel=true (megatron's MoE layer refuses to train without it)"
        )
    return problems


def _batch_problems(cfg: MegamftConfig, world_size: int) -> list[str]:
    t = cfg.train
    p = cfg.parallel
    model_parallel = (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    )
    if world_size % model_parallel:
        return []  # already reported; DP is undefined
    dp = world_size // model_parallel
    problems = []
    if t.global_batch_size % (t.micro_batch_size * dp):
        problems.append(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
        )
    if 0 < cfg.data.valid_samples_per_task < t.micro_batch_size * dp:
        problems.append(
            f"data.valid_samples_per_task ({cfg.data.valid_samples_per_task}) must be at least "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) to validate"
        )
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp and not problems:
        microbatches = t.global_batch_size // (t.micro_batch_size * dp)
        if microbatches % p.pipeline_model_parallel_size:
            problems.append(
                f"the interleaved schedule needs micro-batches per step ({microbatches}) "
                f"divisible by parallel.pipeline_model_parallel_size "
                f"({p.pipeline_model_parallel_size})"
            )
    if cfg.loss.fused_cross_entropy and cfg.loss.mode == "focal":
        problems.append(
            "loss.fused_cross_entropy does not support loss.mode=focal (its weights need the "
            "per-token losses first); use the default cross entropy for focal"
        )
    loss = cfg.loss
    if loss.mode == "coba" and cfg.data.valid_samples_per_task == 0:
        problems.append(
            "loss.mode=coba measures convergence on validation data: set data.valid_samples_per_task > 0"
        )
    if loss.coba_warmup <= loss.coba_update_interval:
        problems.append(
            f"loss.coba_warmup ({loss.coba_warmup}) must exceed loss.coba_update_interval "
            f"({loss.coba_update_interval}): CoBa's first update needs a measurement"
        )
    if (
        loss.mode == "coba"
        and p.virtual_pipeline_model_parallel_size
        and loss.coba_valid_micro_batches % p.pipeline_model_parallel_size
    ):
        problems.append(
            "the interleaved schedule needs loss.coba_valid_micro_batches divisible by "
            f"parallel.pipeline_model_parallel_size ({p.pipeline_model_parallel_size})"
        )
    if t.lr_warmup_steps >= t.train_steps:
        problems.append(
            f"train.lr_warmup_steps ({t.lr_warmup_steps}) must be at least 0 and less than "
            f"train.train_steps ({t.train_steps})"
        )
    return problems

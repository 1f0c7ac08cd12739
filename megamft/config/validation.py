"""Cross-section rules (divisibility, world size, data, LoRA), checked before any process group starts."""

from __future__ import annotations

from pathlib import Path

from megamft.config.schema import LORA_TARGETS, ConfigError, MegamftConfig


def data_parallel_size(cfg: MegamftConfig, world_size: int) -> int:
    """DP replicas for this world size (assumes ``validate`` passed)."""
    p = cfg.parallel
    return world_size // (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    )


def validate(cfg: MegamftConfig, world_size: int) -> None:
    """Check cross-section rules; raise one ConfigError listing every problem."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    problems = _model_problems(cfg) + _parallel_problems(cfg, world_size)
    problems += _batch_problems(cfg, world_size) + _data_problems(cfg) + _lora_problems(cfg)
    problems += _expert_problems(cfg, world_size) + _overlap_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _overlap_problems(cfg: MegamftConfig) -> list[str]:
    """The parameter all-gather exists only with the distributed optimizer (without it the option would
    silently do nothing); without overlap_grad_reduce megatron keeps one bucket per buffer, so nothing
    would overlap (Megatron-LM refuses that pairing too)."""
    if not cfg.ddp.get("overlap_param_gather"):
        return []
    problems = []
    if not cfg.optimizer.get("use_distributed_optimizer", True):
        problems.append("ddp.overlap_param_gather needs optimizer.use_distributed_optimizer=true "
                        "(it overlaps the distributed optimizer's parameter all-gather)")
    if not cfg.ddp.get("overlap_grad_reduce"):
        problems.append("ddp.overlap_param_gather needs ddp.overlap_grad_reduce=true (its buckets are what "
                        "the gather overlaps with the forward pass)")
    return problems


def _context_parallel_problems(cfg: MegamftConfig, cp: int, tp: int) -> list[str]:
    """CP splits every sequence into 2 x CP chunks inside Transformer Engine's attention."""
    problems = []
    multiple = 2 * cp * (tp if cfg.parallel.sequence_parallel else 1)
    if cfg.data.seq_length % multiple:
        problems.append(f"data.seq_length ({cfg.data.seq_length}) must be divisible by {multiple} "
                        "(2 x CP, x TP with sequence parallel) with context parallelism")
    if cfg.data.mode == "dynamic" and cfg.data.pad_to_multiple_of % multiple:
        problems.append(f"data.pad_to_multiple_of must be a multiple of {multiple} with context parallelism")
    if cfg.data.mode == "pack":
        problems.append("data.mode=pack is not supported with context parallelism yet; use pad, dynamic or concat")
    if cfg.loss.mode == "focal":
        problems.append("loss.mode=focal needs whole samples' losses on one rank; not with context parallelism")
    return problems


def _lora_problems(cfg: MegamftConfig) -> list[str]:
    if cfg.lora.save_adapters_only and not (cfg.lora.enabled and cfg.checkpoint.load_dir):
        return ["lora.save_adapters_only needs lora.enabled=true and checkpoint.load_dir (the base weights, "
                "or an earlier LoRA checkpoint of this run)"]
    return []


def _data_problems(cfg: MegamftConfig) -> list[str]:
    d = cfg.data
    problems = []
    if d.source == "indexed" and not d.path:
        problems.append("data.source=indexed needs data.path, a megamft-preprocess output folder")
    if d.source == "indexed" and d.path and not (Path(d.path) / "manifest.json").is_file():
        problems.append(f"data.path={d.path} has no manifest.json; run megamft-preprocess --out {d.path} first")
    if d.task_sampling == "weights" and not d.task_sampling_weights:
        problems.append("data.task_sampling=weights needs data.task_sampling_weights, e.g. {code_completion: 2.0}")
    if d.task_sampling_weights and d.task_sampling != "weights":
        problems.append("data.task_sampling_weights is set but data.task_sampling is not 'weights'")
    if d.pack_window < 1 or d.pad_to_multiple_of < 1:
        problems.append("data.pack_window and data.pad_to_multiple_of must be >= 1")
    tp = cfg.parallel.tensor_model_parallel_size
    if d.mode == "dynamic" and cfg.parallel.sequence_parallel and tp > 0 and d.pad_to_multiple_of % tp:
        problems.append(f"data.pad_to_multiple_of ({d.pad_to_multiple_of}) must be a multiple of "
                        f"parallel.tensor_model_parallel_size ({tp}) with sequence parallel")
    if d.epoch_samples is not None and d.epoch_samples < 1:
        problems.append(f"data.epoch_samples must be >= 1 or null, got {d.epoch_samples}")
    return problems


def _model_problems(cfg: MegamftConfig) -> list[str]:
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    groups = m.num_query_groups or m.num_attention_heads
    problems = []
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        if getattr(m, name) < 1:
            problems.append(f"model.{name} must be positive, got {getattr(m, name)}")
    if m.kv_channels is None and m.num_attention_heads > 0 and m.hidden_size % m.num_attention_heads:
        problems.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({m.num_attention_heads})"
        )
    if groups > 0 and m.num_attention_heads % groups:
        problems.append(
            f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
            f"model.num_query_groups ({groups})"
        )
    if tp > 0 and m.num_attention_heads % tp:
        problems.append(
            f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if tp > 0 and groups > 0 and groups % tp and tp % groups:  # fewer groups than TP: megatron replicates them
        problems.append(
            f"model.num_query_groups ({groups}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp}) or divide it"
        )
    if tp > 0 and m.ffn_hidden_size % tp:
        problems.append(
            f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    positive = {"data.seq_length": cfg.data.seq_length, "train.log_interval": cfg.train.log_interval,
                "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by}
    if m.num_query_groups is not None:
        positive["model.num_query_groups"] = m.num_query_groups
    problems += [f"{k} must be >= 1, got {v}" for k, v in positive.items() if v < 1]
    non_negative = {"data.valid_samples_per_task": cfg.data.valid_samples_per_task,
                    "train.eval_interval": cfg.train.eval_interval,
                    "checkpoint.save_interval": cfg.checkpoint.save_interval}
    problems += [f"{k} must be >= 0, got {v}" for k, v in non_negative.items() if v < 0]
    if m.attention_backend in ("torch", "local") and p.context_parallel_size > 1:
        problems.append(f"model.attention_backend={m.attention_backend} has no context parallelism; use "
                        "model.attention_backend=te (Transformer Engine) with parallel.context_parallel_size > 1")
    if m.attention_backend == "te" and cfg.lora.enabled:
        problems.append("model.attention_backend=te with lora.enabled: TE's norm-fused linears would hand the "
                        "adapters un-normalized inputs; use model.attention_backend=torch (or auto)")
    if m.sliding_window is not None and m.sliding_window < 1:
        problems.append(f"model.sliding_window must be >= 1 or null, got {m.sliding_window}")
    elif m.sliding_window and cfg.data.seq_length > m.sliding_window and p.context_parallel_size > 1:
        problems.append(
            f"model.sliding_window ({m.sliding_window}) is shorter than data.seq_length ({cfg.data.seq_length}) "
            f"with parallel.context_parallel_size={p.context_parallel_size}: windowed attention under context "
            "parallelism is untested in megamft; use context_parallel_size=1 or sequences up to the window"
        )
    if m.kv_channels is not None and m.kv_channels < 1:
        problems.append(f"model.kv_channels must be >= 1 or null, got {m.kv_channels}")
    problems += _rope_problems(m) + _layer_feature_problems(cfg)
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
    keys = ("rope_llama3_low_freq_factor", "rope_llama3_high_freq_factor",
            "rope_llama3_original_max_position_embeddings")
    missing = [f"model.{k}" for k in keys if getattr(m, k) is None]
    if missing:
        return [f"model.rope_scaling_type=llama3 needs {', '.join(missing)} (from the model's config.json "
                "rope_parameters; megamft does not assume Llama 3.1's values)"]
    if m.rope_llama3_high_freq_factor <= m.rope_llama3_low_freq_factor:
        return [f"model.rope_llama3_high_freq_factor ({m.rope_llama3_high_freq_factor}) must exceed "
                f"model.rope_llama3_low_freq_factor ({m.rope_llama3_low_freq_factor})"]
    return []


def _layer_feature_problems(cfg: MegamftConfig) -> list[str]:
    """Windows per layer, soft-capping, post-sublayer norms: values, and the backends that compute them."""
    m, problems = cfg.model, []
    if m.sliding_window_layers is not None:
        if len(m.sliding_window_layers) != m.num_layers:
            problems.append(f"model.sliding_window_layers has {len(m.sliding_window_layers)} entries; "
                            f"model.num_layers is {m.num_layers}")
        if not m.sliding_window:
            problems.append("model.sliding_window_layers needs model.sliding_window")
    positive = {"model.attention_logit_softcap": m.attention_logit_softcap,
                "model.final_logit_softcap": m.final_logit_softcap, "model.attention_scale_dim": m.attention_scale_dim}
    problems += [f"{k} must be > 0 or null, got {v}" for k, v in positive.items() if v is not None and v <= 0]
    if m.attention_logit_softcap and m.attention_backend in ("te", "local"):
        problems.append(f"model.attention_logit_softcap with model.attention_backend={m.attention_backend}: only the "
                        "torch backend computes attention soft-capping; use model.attention_backend=torch (or auto)")
    if m.post_sublayer_norms and m.attention_backend == "te":
        problems.append("model.post_sublayer_norms with model.attention_backend=te: the norms after attention and "
                        "MLP are built in the local layer; use model.attention_backend=torch (or auto)")
    if m.post_sublayer_norms and m.num_experts:
        problems.append("model.post_sublayer_norms with model.num_experts: no norm after an MoE layer is supported")
    return problems


def _yarn_problems(m) -> list[str]:
    problems = []
    if not m.rope_yarn_original_max_position_embeddings or m.rope_yarn_original_max_position_embeddings < 1:
        problems.append("model.rope_scaling_type=yarn needs model.rope_yarn_original_max_position_embeddings >= 1 "
                        "(the model's rope_parameters.original_max_position_embeddings)")
    if m.rope_yarn_beta_fast <= 0 or m.rope_yarn_beta_slow <= 0:
        problems.append("model.rope_yarn_beta_fast and model.rope_yarn_beta_slow must be > 0")
    explicit = m.rope_yarn_attention_factor is not None and m.rope_yarn_attention_factor != 1.0
    if m.rope_scaling_factor <= 1 and explicit:
        problems.append(f"model.rope_scaling_factor ({m.rope_scaling_factor}) must exceed 1 with "
                        "model.rope_yarn_attention_factor: megatron-core's YaRN derives the attention factor from "
                        "the scaling factor's logarithm")
    return problems


def _parallel_problems(cfg: MegamftConfig, world_size: int) -> list[str]:
    p = cfg.parallel
    sizes = {
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "context_parallel_size": p.context_parallel_size,
    }
    problems = [f"parallel.{k} must be >= 1, got {v}" for k, v in sizes.items() if v < 1]
    if problems:
        return problems
    tp, pp, cp = sizes.values()
    vpp = p.virtual_pipeline_model_parallel_size
    stages = pp * (vpp or 1)
    if cfg.model.num_layers % stages:
        what = f"pipeline_model_parallel_size ({pp})"
        if vpp:
            what += f" x virtual_pipeline_model_parallel_size ({vpp})"
        problems.append(f"model.num_layers ({cfg.model.num_layers}) must be divisible by parallel.{what}")
    if vpp is not None and (vpp < 1 or pp < 2):
        problems.append(
            "parallel.virtual_pipeline_model_parallel_size needs "
            f"pipeline_model_parallel_size >= 2 and a value >= 1 (got PP={pp}, VPP={vpp})"
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
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    if m.num_experts is None:
        if ep != 1 or p.expert_tensor_parallel_size is not None:
            return ["parallel.expert_model_parallel_size / expert_tensor_parallel_size need a mixture-of-experts "
                    "model (model.num_experts)"]
        return []
    problems = []
    if min(m.num_experts, m.moe_router_topk, ep, etp) < 1:
        return ["model.num_experts, model.moe_router_topk, parallel.expert_model_parallel_size and "
                "parallel.expert_tensor_parallel_size must be >= 1"]
    if m.moe_router_topk > m.num_experts:
        problems.append(f"model.moe_router_topk ({m.moe_router_topk}) exceeds model.num_experts ({m.num_experts})")
    if m.num_experts % ep:
        problems.append(f"model.num_experts ({m.num_experts}) must be divisible by "
                        f"parallel.expert_model_parallel_size ({ep})")
    expert_ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size
    if expert_ffn % etp:
        problems.append(f"model.moe_ffn_hidden_size ({expert_ffn}) must be divisible by the expert tensor "
                        f"parallel size ({etp})")
    expert_ranks = etp * ep * p.pipeline_model_parallel_size
    if world_size % expert_ranks:
        problems.append(f"world size {world_size} is not divisible by expert TP x EP x PP = {etp} x {ep} x "
                        f"{p.pipeline_model_parallel_size}; change parallel.expert_model_parallel_size")
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        problems.append("a mixture-of-experts model with parallel.tensor_model_parallel_size > 1 needs "
                        "parallel.sequence_parallel=true (megatron's MoE layer refuses to train without it)")
    if m.moe_aux_loss_coeff < 0 or m.moe_z_loss_coeff < 0:
        problems.append("model.moe_aux_loss_coeff and model.moe_z_loss_coeff must be >= 0")
    mlp_targets = sorted({"linear_fc1", "linear_fc2"} & set(cfg.lora.targets))
    if cfg.lora.enabled and mlp_targets:
        problems.append(f"lora.targets {mlp_targets}: LoRA on the experts of a mixture-of-experts model is not "
                        "supported; set lora.targets=[linear_qkv, linear_proj]")
    return problems


def _batch_problems(cfg: MegamftConfig, world_size: int) -> list[str]:
    t = cfg.train
    p = cfg.parallel
    model_parallel = (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    )
    if min(t.micro_batch_size, t.global_batch_size, t.train_steps) < 1 or model_parallel < 1:
        return ["train.micro_batch_size, train.global_batch_size and train.train_steps must be >= 1"]
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
    unknown_targets = sorted(set(cfg.lora.targets) - set(LORA_TARGETS))
    if unknown_targets or cfg.lora.rank < 1:
        problems.append(f"lora.rank must be >= 1 and lora.targets a subset of {list(LORA_TARGETS)} "
                        f"(got rank {cfg.lora.rank}, unknown targets {unknown_targets})")
    if cfg.loss.fused_cross_entropy and cfg.loss.mode == "focal":
        problems.append("loss.fused_cross_entropy does not support loss.mode=focal (its weights need the "
                        "per-token losses first); use the default cross entropy for focal")
    bad_weights = {k: v for k, v in cfg.loss.task_weights.items() if v < 0}
    if bad_weights:
        problems.append(f"loss.task_weights must be >= 0, got {bad_weights}")
    loss = cfg.loss
    if loss.mode == "coba" and cfg.data.valid_samples_per_task == 0:
        problems.append("loss.mode=coba measures convergence on validation data: set data.valid_samples_per_task > 0")
    if loss.coba_update_interval < 1 or loss.coba_history < 1 or loss.coba_valid_micro_batches < 1:
        problems.append("loss.coba_update_interval, loss.coba_history and loss.coba_valid_micro_batches must be >= 1")
    if loss.coba_warmup <= loss.coba_update_interval:
        problems.append(f"loss.coba_warmup ({loss.coba_warmup}) must exceed loss.coba_update_interval "
                        f"({loss.coba_update_interval}): CoBa's first update needs a measurement")
    if loss.mode == "coba" and p.virtual_pipeline_model_parallel_size and \
            loss.coba_valid_micro_batches % p.pipeline_model_parallel_size:
        problems.append("the interleaved schedule needs loss.coba_valid_micro_batches divisible by "
                        f"parallel.pipeline_model_parallel_size ({p.pipeline_model_parallel_size})")
    if t.lr_warmup_steps < 0 or t.lr_warmup_steps >= t.train_steps:
        problems.append(
            f"train.lr_warmup_steps ({t.lr_warmup_steps}) must be at least 0 and less than "
            f"train.train_steps ({t.train_steps})"
        )
    return problems

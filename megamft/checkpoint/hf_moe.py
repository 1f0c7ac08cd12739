"""Expert weights of MoE families, Hugging Face <-> megatron.

megatron keeps one layer's routed experts as stacked tensors: ``linear_fc1``
[experts, 2 x ffn, hidden] (each expert's [gate; up]) and ``linear_fc2``
[experts, hidden, ffn], under SequentialMLP's keys whichever expert module
(SequentialMLP, TE's grouped GEMM) wrote them.

Two layouts are found on disk:
- one tensor per expert, as published checkpoints hold and as transformers 5
  still writes them (it fuses on load through its conversion mapping):
  Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen2/Qwen3-MoE ``mlp.experts.{e}.gate_proj/up_proj/down_proj``;
- the fused 3-D tensors of transformers' in-memory experts module:
  ``mlp.experts.gate_up_proj`` [experts, 2 x ffn, hidden] ([gate; up], megatron's own order)
  and ``mlp.experts.down_proj`` [experts, hidden, ffn].
Both are read; exports write the per-expert layout, which every transformers version loads.

The mappings here quack like hf_convert.Mapping with kind "moe": each carries
its shapes and how to join and split its tensors, so the one conversion engine
handles them without knowing about experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megamft.config import ModelConfig

MOE_KIND = "moe"
_FUSED_SUFFIX = ".mlp.experts.gate_up_proj"


@dataclass(frozen=True)
class ExpertMapping:
    """One megatron MoE parameter and the Hugging Face tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    hf_tensor_shapes: tuple[tuple[int, ...], ...]
    megatron_tensor_shape: tuple[int, ...]
    join: Callable[[list[torch.Tensor]], torch.Tensor]
    split: Callable[[torch.Tensor], list[torch.Tensor]]
    kind: str = MOE_KIND
    per_layer: bool = True
    layer_prefix: str = "model.layers.{i}."
    fused: bool = False
    moe_layers: bool | None = True
    """Present in the MoE layers only (DeepSeek's first layers are dense)."""

    def needed(self, model: ModelConfig) -> bool:
        return True


def _copy(megatron: str, hf: str, shape: tuple[int, ...]) -> ExpertMapping:
    return ExpertMapping(megatron, (hf,), (shape,), shape, lambda t: t[0], lambda t: [t])


def _per_expert(
    megatron: str, names: list[tuple[str, ...]], shape: tuple[int, ...], parts: int
) -> ExpertMapping:
    """Stack experts; each expert's `parts` tensors are concatenated along dim 0 ([gate; up])."""
    experts = len(names)
    part_shape = (shape[0] // parts, *shape[1:])

    def join(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(
            [torch.cat(tensors[e * parts : (e + 1) * parts]) for e in range(experts)]
        )

    def split(tensor: torch.Tensor) -> list[torch.Tensor]:
        return [part for expert in tensor for part in expert.chunk(parts)]

    flat = tuple(n for group in names for n in group)
    return ExpertMapping(megatron, flat, (part_shape,) * len(flat), (experts, *shape), join, split)


_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
_ROUTER = "decoder.layers.mlp.router.weight"

# Per-expert names: (router, expert prefix, gate, up, down) per family.
_PUBLISHED = {
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
    "deepseek_v2": ("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
}
# Shared-expert MLP prefix per family (Qwen2-MoE's default).
_SHARED = {"deepseek_v2": "mlp.shared_experts."}


def is_fused(weight_names) -> bool:
    """Whether a checkpoint holds transformers' fused 3-D expert tensors."""
    return any(name.endswith(_FUSED_SUFFIX) for name in weight_names)


def expert_mappings(model: ModelConfig, family: str, fused: bool = False) -> list[ExpertMapping]:
    """The MoE mappings of one layer (empty for a dense model)."""
    if model.num_experts is None:
        return []
    e, h = model.num_experts, model.hidden_size
    f = model.moe_ffn_hidden_size or model.ffn_hidden_size
    router, prefix, gate, up, down = _PUBLISHED[family]
    if fused:
        mappings = [
            _copy(_ROUTER, "mlp.gate.weight", (e, h)),
            _copy(_FC1, "mlp.experts.gate_up_proj", (e, 2 * f, h)),
            _copy(_FC2, "mlp.experts.down_proj", (e, h, f)),
        ]
    else:
        names = [prefix.format(e=i) for i in range(e)]
        mappings = [
            _copy(_ROUTER, router, (e, h)),
            _per_expert(
                _FC1, [(n + gate + ".weight", n + up + ".weight") for n in names], (2 * f, h), 2
            ),
            _per_expert(_FC2, [(n + down + ".weight",) for n in names], (h, f), 1),
        ]
    shared, prefix = (
        model.moe_shared_expert_intermediate_size,
        _SHARED.get(family, "mlp.shared_expert."),
    )
    if shared:
        mappings += [
            ExpertMapping(
                "decoder.layers.mlp.shared_experts.linear_fc1.weight",
                (prefix + "gate_proj.weight", prefix + "up_proj.weight"),
                ((shared, h), (shared, h)),
                (2 * shared, h),
                torch.cat,
                lambda t: list(t.chunk(2)),
            ),
            _copy(
                "decoder.layers.mlp.shared_experts.linear_fc2.weight",
                prefix + "down_proj.weight",
                (h, shared),
            ),
        ]
        if model.moe_shared_expert_gate:
            mappings.append(
                _copy(
                    "decoder.layers.mlp.shared_experts.gate_weight",
                    "mlp.shared_expert_gate.weight",
                    (1, h),
                )
            )
    return mappings

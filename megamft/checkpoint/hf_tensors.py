"""One mapping's tensor between megatron's layout and Hugging Face's: shapes, fused and interleaved parts
(megatron interleaves q, k and v per query group; Hugging Face keeps them apart), vocabulary padding."""

from __future__ import annotations

from dataclasses import replace

import torch

from megamft.checkpoint import hf_moe
from megamft.checkpoint.hf_mappings import Dims, Mapping, part_shapes


def megatron_shape(mapping: Mapping, d: Dims) -> tuple[int, ...]:
    """Shape of one layer's (or the whole) megatron tensor."""
    if mapping.kind == hf_moe.MOE_KIND:
        return mapping.megatron_tensor_shape
    shapes = part_shapes(mapping, d)
    if mapping.kind == "vocab":
        return (d.padded_vocab, d.hidden)
    if mapping.kind in ("qkv", "gate_up"):
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return shapes[0]


def to_megatron(mapping: Mapping, tensors: list[torch.Tensor], d: Dims) -> torch.Tensor:
    if mapping.kind == hf_moe.MOE_KIND:
        return mapping.join(tensors)
    if (
        mapping.fused
    ):  # one tensor holding the parts one after another (Phi-3's qkv_proj, gate_up_proj)
        tensors = list(tensors[0].split([s[0] for s in part_shapes(mapping, d)]))
    if mapping.kind == "copy":
        return tensors[0]
    if mapping.kind == "vocab":
        padding = tensors[0].new_zeros(d.padded_vocab - d.vocab, d.hidden)
        return torch.cat([tensors[0], padding])
    if mapping.kind == "gate_up":
        return torch.cat(tensors)
    # qkv: megatron interleaves per query group: [q of group g, k of g, v of g] for each g.
    q, k, v = tensors
    per_group = d.heads // d.groups
    rest = q.shape[1:]
    q = q.reshape(d.groups, per_group * d.head_dim, *rest)
    k = k.reshape(d.groups, d.head_dim, *rest)
    v = v.reshape(d.groups, d.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def to_hf(mapping: Mapping, tensor: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    if mapping.kind == hf_moe.MOE_KIND:
        return mapping.split(tensor)
    if mapping.fused:
        return [torch.cat(_parts_to_hf(replace(mapping, fused=False), tensor, d))]
    return _parts_to_hf(mapping, tensor, d)


def _parts_to_hf(mapping: Mapping, tensor: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    if mapping.kind == "copy":
        return [tensor]
    if mapping.kind == "vocab":
        return [tensor[: d.vocab]]
    if mapping.kind == "gate_up":
        return list(tensor.chunk(2))
    per_group = d.heads // d.groups
    rest = tensor.shape[1:]
    grouped = tensor.reshape(d.groups, (per_group + 2) * d.head_dim, *rest)
    q, k, v = grouped.split([per_group * d.head_dim, d.head_dim, d.head_dim], dim=1)
    return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]

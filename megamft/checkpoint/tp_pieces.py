"""The pieces megatron splits each parameter into over tensor-parallel ranks, and their files.

A rank loading a dist checkpoint asks for the region of each global tensor it
holds; torch's FileSystemReader reads every stored chunk that region touches
in full (``torch.load`` of the chunk, then a narrow: filesystem.py read_data),
once per requested piece. A layer stored whole is so read whole by each TP
rank, and twice for a gated MLP's fc1. Stored as the pieces one rank holds at
TP=N, it is read exactly by each rank at TP=N and at any TP dividing N.

The splits follow megatron-core 0.16's sharded_state_dict:
- column-parallel linears (linear_qkv, linear_fc1, output_layer, multi-latent
  attention's five projections) and the vocab-parallel embedding: dim 0,
  weight and bias (tensor_parallel/layers.py);
- row-parallel linears (linear_proj, linear_fc2): weight dim 1, bias replicated;
- a gated MLP's linear_fc1 [gate; up]: 2 x TP pieces on dim 0, rank r holding
  pieces r and TP + r (apply_swiglu_sharded_factory, transformer/mlp.py);
- routed experts: a chunk per expert (SequentialMLP.sharded_state_dict gives
  each its own offset on the expert axis), split as its MLP over expert TP;
- norms (fused into linear_qkv / linear_fc1 or standalone, Gemma 2's
  post_layernorm of attention and MLP), learned position embeddings
  (a plain torch Embedding in LanguageModelEmbedding), the router and the
  shared-expert gate: replicated.
Files follow the ranks of a TP x PP run: a stage's pieces of TP rank r go to
``__{stage * TP + r}_0.distcp``, replicated tensors to its TP rank 0's file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Split:
    """How one layer's tensor of a parameter is split over TP ranks."""

    axis: int | None
    """Axis split over TP ranks; None: replicated on every rank."""
    pieces_per_rank: int = 1
    """Pieces each rank holds along `axis` (2 for a gated fc1: a gate piece and an up piece)."""
    per_expert: bool = False
    """Axis 0 indexes routed experts, each stored as its own chunk."""


@dataclass(frozen=True)
class Piece:
    """One stored chunk of one layer's tensor, and the TP rank that holds it."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    tp_rank: int


_REPLICATED_MODULES = (
    "final_layernorm",
    "q_layernorm",
    "k_layernorm",
    "router",
    "post_layernorm",
    "position_embeddings",
    "input_layernorm",
)
# Multi-latent attention's projections: ColumnParallelLinear in megatron's local MLA layer (the down
# projections too, gathered after; Transformer Engine's layer keeps those whole: either loads these pieces).
_COLUMN_MODULES = (
    "word_embeddings",
    "output_layer",
    "linear_qkv",
    "linear_q_proj",
    "linear_q_down_proj",
    "linear_q_up_proj",
    "linear_kv_down_proj",
    "linear_kv_up_proj",
)


def split_of(key: str, gated: bool) -> Split:
    """megatron's TP split of a global key (layer axis excluded); `gated`: a gated MLP (fc1 = [gate; up])."""
    module, param = key.rsplit(".", 1)
    leaf = module.rsplit(".", 1)[-1]
    experts = ".experts.experts." in key
    shift = 1 if experts else 0
    if param.startswith("layer_norm_") or leaf in _REPLICATED_MODULES or param == "gate_weight":
        return Split(None)
    if leaf in _COLUMN_MODULES:
        return Split(0)
    if leaf == "linear_fc1":
        return Split(shift, 2 if gated else 1, experts)
    if leaf in ("linear_proj", "linear_fc2"):
        return Split(1 + shift, 1, experts) if param == "weight" else Split(None)
    raise ValueError(f"no tensor-parallel split is known for {key}; add it to tp_pieces.split_of")


def pieces(shape: tuple[int, ...], split: Split, tp: int) -> list[Piece]:
    """The chunks to store one layer's tensor of `shape` in, for TP=`tp`."""
    if split.per_expert:
        inner = pieces(shape[1:], replace(split, axis=split.axis - 1, per_expert=False), tp)
        return [
            Piece((e, *p.offsets), (1, *p.shape), p.tp_rank) for e in range(shape[0]) for p in inner
        ]
    zeros = (0,) * len(shape)
    if split.axis is None:
        return [Piece(zeros, tuple(shape), 0)]
    count = tp * split.pieces_per_rank
    if shape[split.axis] % count:
        raise ValueError(
            f"dimension {split.axis} of {tuple(shape)} does not split into {count} pieces"
        )
    size = shape[split.axis] // count
    return [
        Piece(_at(zeros, split.axis, i * size), _at(tuple(shape), split.axis, size), i % tp)
        for i in range(count)
    ]


def _at(values: tuple[int, ...], axis: int, value: int) -> tuple[int, ...]:
    return values[:axis] + (value,) + values[axis + 1 :]


def stage_of(key: str, layer: int | None, num_layers: int, pp: int) -> int:
    """The pipeline stage that holds a tensor: its layer's, the embedding's first, the rest's last."""
    if layer is not None:
        return layer // (num_layers // pp)
    return 0 if key.startswith("embedding.") else pp - 1


def file_of(stage: int, tp_rank: int, tp: int) -> str:
    """Data file (without suffix) of a stage's pieces held by one TP rank, named as that rank's own."""
    return f"__{stage * tp + tp_rank}_0"

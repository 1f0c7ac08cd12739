"""LoRA adapters out of a megamft checkpoint: merged into the exported weights, or as a PEFT adapter.

Merged: W + s B A for every adapted linear (s = alpha / r, or alpha / sqrt(r)
with rsLoRA). A QLoRA run (lora.quantize_base) trained over its base as each
tensor-parallel rank quantized it, so the merge starts from that: the base
shard of every training rank, NF4-quantized and dequantized as the rank did
(bitsandbytes, in the training precision), the way QLoRA models are released.

PEFT: ``adapter_config.json`` and ``adapter_model.safetensors`` for the
Hugging Face base, loadable by ``peft.PeftModel.from_pretrained`` and servable
by vLLM. megatron fuses q/k/v into linear_qkv and SwiGLU's gate and up into
linear_fc1, each with one A: the adapter of each Hugging Face projection is
that A with its rows of B, so B_q A x, B_k A x, B_v A x are exactly the fused
adapter's outputs (rank r each). Routed experts are written per expert, as
Hugging Face checkpoints list them (PEFT fuses them for transformers 5's
experts on load).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from megamft.checkpoint import global_view, hf_moe, tp_pieces
from megamft.checkpoint.hf_mappings import Dims, Mapping, hf_names, needed_mappings
from megamft.checkpoint.hf_tensors import to_hf
from megamft.config import MegamftConfig

PEFT_ADAPTER_OUTPUT = "megatron-to-peft-adapter"  # kind of output folder (see output_folder)
_BASE_LINEARS = (
    "linear_qkv.weight",
    "linear_proj.weight",
    "linear_fc1.weight",
    "linear_fc2.weight",
)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- merged into the weights


def merged_layer(
    ckpt: Path, index: dict, cfg: MegamftConfig, regions: list, tensors: list, from_base: bool
) -> list:
    """One layer's tensors (regions of the base) with the run's adapters merged in. With `from_base` (an
    adapter-only checkpoint: the tensors are its base checkpoint's), a QLoRA run's base linears are first
    what its ranks computed with (nf4_as_trained), and the sum is rounded to the training precision, as the
    ranks would merge (LoRA layers' merge_adapter). A full QLoRA save holds those weights already."""
    merged = list(tensors)
    quantized = cfg.lora.enabled and cfg.lora.quantize_base and from_base
    for i, region in enumerate(regions):
        if not region.key.endswith(_BASE_LINEARS):
            continue
        tensor = (
            nf4_as_trained(region.key, tensors[i][0], cfg).unsqueeze(0) if quantized else tensors[i]
        )
        stem = region.key.removesuffix(".weight")
        if f"{stem}.lora_A" in index:
            a, b = _read_adapter(ckpt, index, stem, region.offsets[0])
            delta = cfg.lora.scale * (b.float() @ a.float())
            tensor = (tensor.float() + delta.unsqueeze(0)).to(tensor.dtype)
        merged[i] = tensor
    return merged


def _read_adapter(
    ckpt: Path, index: dict, stem: str, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of one layer's linear (routed experts: stacked over experts)."""
    regions = []
    for name in ("lora_A", "lora_B"):
        shape = tuple(index[f"{stem}.{name}"].size)
        regions.append(
            global_view.Region(
                f"{stem}.{name}", (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])
            )
        )
    a, b = global_view.read_regions(ckpt, regions)
    return a[0], b[0]


def nf4_as_trained(key: str, tensor: torch.Tensor, cfg: MegamftConfig) -> torch.Tensor:
    """One layer's base weight as a QLoRA run computed with it: each training rank's shard (each expert's,
    for routed experts) quantized to NF4 and dequantized by bitsandbytes, in the training precision."""
    from megamft.model.nf4 import quantize_nf4

    p = cfg.parallel
    experts = ".experts.experts." in key
    tp = (
        (p.expert_tensor_parallel_size or p.tensor_model_parallel_size)
        if experts
        else p.tensor_model_parallel_size
    )
    split = tp_pieces.split_of(key, cfg.model.mlp_activation == "swiglu")
    dtype = _DTYPES[cfg.train.precision]
    out = torch.empty(tensor.shape, dtype=dtype)
    for group in _rank_shards(tuple(tensor.shape), split, tp):
        local = torch.cat([_narrow(tensor, piece) for piece in group], dim=split.axis)
        packed, statistics = quantize_nf4(local.to(dtype))
        back = statistics.dequantize(packed)
        for piece, part in zip(
            group, back.split([piece.shape[split.axis] for piece in group], dim=split.axis)
        ):
            _narrow(out, piece).copy_(part)
    return out


def _rank_shards(
    shape: tuple[int, ...], split: tp_pieces.Split, tp: int
) -> list[list[tp_pieces.Piece]]:
    """The pieces each training rank held as one local tensor (per expert for routed experts), in order."""
    groups: dict[tuple, list] = {}
    for piece in tp_pieces.pieces(shape, split, tp):
        owner = (piece.offsets[0] if split.per_expert else None, piece.tp_rank)
        groups.setdefault(owner, []).append(piece)
    return list(groups.values())


def _narrow(tensor: torch.Tensor, piece: tp_pieces.Piece) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(piece.offsets, piece.shape)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


# ---------------------------------------------------------------- PEFT adapter


def peft_adapter_tensors(
    ckpt: Path, cfg: MegamftConfig, mappings: list[Mapping], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """PEFT's key -> tensor for every adapted linear of every layer in the checkpoint."""
    index = global_view.tensor_index(ckpt)
    d = Dims.of(cfg.model)
    out = {}
    for mapping in mappings:
        stem = mapping.megatron.removesuffix(".weight")
        if (
            not mapping.per_layer
            or not mapping.megatron.endswith(_BASE_LINEARS)
            or f"{stem}.lora_A" not in index
        ):
            continue
        for layer in range(cfg.model.num_layers):
            a, b = _read_adapter(ckpt, index, stem, layer)
            for module, a_part, b_part in _hf_adapters(mapping, a, b, d, layer):
                out[f"base_model.model.{module}.lora_A.weight"] = a_part.to(
                    dtype or a_part.dtype
                ).clone()
                out[f"base_model.model.{module}.lora_B.weight"] = b_part.to(
                    dtype or b_part.dtype
                ).clone()
    return out


def _hf_adapters(mapping: Mapping, a: torch.Tensor, b: torch.Tensor, d: Dims, layer: int):
    """(Hugging Face module, A, B) for each projection a fused megatron linear is made of."""
    names = hf_names(mapping, layer)
    b_parts = to_hf(mapping, b, d)
    if mapping.kind == hf_moe.MOE_KIND and a.dim() == 3:  # routed experts: [experts, r, in]
        per_expert = len(names) // a.shape[0]
        a_parts = [a[i // per_expert] for i in range(len(names))]
    else:
        a_parts = [a] * len(names)
    return [
        (name.removesuffix(".weight"), a_part, b_part)
        for name, a_part, b_part in zip(names, a_parts, b_parts)
    ]


def adapter_config(
    cfg: MegamftConfig, modules: list[str], all_linears: list[str], base: str | None
) -> dict:
    """PEFT's LoraConfig as adapter_config.json holds it.

    target_modules: the adapted modules' last names when those select exactly them among the base's
    linears (what vLLM and PEFT both read), else a regular expression over their full names.
    """
    lora = cfg.lora
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if sorted(m for m in all_linears if m.rsplit(".", 1)[-1] in leaves) == sorted(modules):
        targets: list[str] | str = leaves
    else:  # e.g. routed experts' gate_proj adapted but not the shared expert's
        targets = "^(" + "|".join(sorted({_pattern(m) for m in modules})) + ")$"
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def _pattern(module: str) -> str:
    """A module name as a regular expression for every layer (and expert) index."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in module.split("."))


def write_peft_adapter(
    folder: Path,
    ckpt: Path,
    cfg: MegamftConfig,
    family,
    base: str | None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `folder`."""
    mappings = needed_mappings(cfg.model, family)
    tensors = peft_adapter_tensors(ckpt, cfg, mappings, dtype)
    if not tensors:
        raise ValueError(
            f"{ckpt} holds no LoRA adapters (lora.enabled was false when it was saved)"
        )
    modules = sorted(
        {
            k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            for k in tensors
            if k.endswith(".lora_A.weight")
        }
    )
    all_linears = [
        name.removesuffix(".weight")
        for m in mappings
        if m.per_layer and m.megatron.endswith(_BASE_LINEARS)
        for layer in range(cfg.model.num_layers)
        for name in hf_names(m, layer)
    ]
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = adapter_config(cfg, modules, all_linears, base)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

"""Hugging Face <-> megatron dist checkpoints, one engine for every family.

Both directions work on megatron's layout-free global view (see global_view):
a converted checkpoint loads at any TP/PP (megatron reshards on load), and an
export reads any trained checkpoint whatever layout wrote it. Tensors stream
one layer at a time, so memory stays near one layer plus one output shard.
A conversion stores each tensor in the pieces the ranks of its target TP x PP
hold, in one file per rank (tp_pieces), so that each rank reads its own shard.

The parameter map is a table (hf_mappings); what differs between parameters
is a *kind*: copy, vocab (padding rows), qkv (megatron fuses q/k/v per query
group) and gate_up (megatron's gated fc1 is [gate; up]), and whether the
Hugging Face side stores the parts as one fused tensor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megamft.checkpoint import global_view, hf_moe, lora_export, tp_pieces
from megamft.checkpoint.export_checks import SOURCE_FILE, check_template, source_identity
from megamft.checkpoint.hf_mappings import (
    Dims,
    Mapping,
    hf_names,
    hf_shapes,
    layer_key,
    layers_of,
    needed_mappings,
    stacked_layers,
)
from megamft.checkpoint.hf_tensors import megatron_shape, to_hf, to_megatron
from megamft.checkpoint.layout import pointed_checkpoint
from megamft.checkpoint.tokenizer_files import (
    copy_tokenizer,
    training_chat_template,
    write_chat_template,
)
from megamft.config import MegamftConfig, ModelConfig, from_dict, to_dict
from megamft.errors import UserError
from megamft.model.families import FAMILIES, Family, hf_config_from_model, model_config_from_hf
from megamft.platform.kill_points import kill_point
from megamft.platform.output_folder import check_destination, mark_output, written_beside
from megamft.sizing.architecture import is_gated

CONVERTED_OUTPUT = "hf-to-megatron"  # kinds of output folder (see output_folder)
HF_EXPORT_OUTPUT = "megatron-to-hf"

# Buffers some transformers versions store; derived from the config, never learned.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message says which tensor and why."""


# ---------------------------------------------------------------- Hugging Face side


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(
            f"{path}: not valid JSON ({err}); the download may be cut short: fetch it again"
        ) from None


def _open_safetensors(path: Path):
    """safe_open, with a damaged or missing file named as the user's to fix."""
    try:
        return safe_open(path, "pt")
    except SafetensorError as err:
        raise ConversionError(
            f"{path}: not a readable safetensors file ({err}); it may be cut short or "
            "damaged: download it again"
        ) from None
    except FileNotFoundError:
        raise ConversionError(
            f"{path} is missing (model.safetensors.index.json names it); download it again"
        ) from None


class SafetensorsFolder:
    """Lazy access to a (possibly sharded) safetensors checkpoint; tracks what was read."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no 'weight_map'; download it again")
        elif (folder / "model.safetensors").is_file():
            with _open_safetensors(folder / "model.safetensors") as handle:
                weight_map = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.weight_map = weight_map
        self.consumed: set[str] = set()

    # Each access opens and closes its file: an open file stays memory-mapped,
    # and every tensor read from it would stay resident until the end.
    def _open(self, name: str):
        return _open_safetensors(self.folder / self.weight_map[name])

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with self._open(name) as handle:
            return _SAFETENSORS_DTYPES[handle.get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        self.consumed.add(name)
        with self._open(name) as handle:
            return handle.get_tensor(name)

    def unconsumed(self) -> list[str]:
        return sorted(
            n for n in set(self.weight_map) - self.consumed if not n.endswith(_IGNORED_HF_SUFFIXES)
        )


def _check_hf_shapes(source: SafetensorsFolder, mappings, d: Dims, model: ModelConfig) -> None:
    for mapping in mappings:
        for layer in layers_of(mapping, model):
            for name, expected in zip(hf_names(mapping, layer), hf_shapes(mapping, d)):
                if name not in source.weight_map:
                    raise ConversionError(f"{source.folder}: tensor {name} is missing")
                if source.shape(name) != expected:
                    raise ConversionError(
                        f"{source.folder}: {name} has shape {source.shape(name)}, "
                        f"config.json implies {expected}"
                    )


# ---------------------------------------------------------------- Hugging Face -> megatron


def check_target_layout(model: ModelConfig, tp: int, pp: int) -> None:
    """Raise if the model cannot be split as asked."""
    if min(tp, pp) < 1:
        raise ConversionError(f"the target TP ({tp}) and PP ({pp}) must be >= 1")
    d = Dims.of(model)
    problems = [
        f"{what} ({value}) is not divisible by {name} ({size})"
        for what, value, name, size in (
            ("attention heads", d.heads, "TP", tp),
            ("ffn hidden size", d.ffn, "TP", tp),
            ("padded vocab", d.padded_vocab, "TP", tp),
            ("shared expert ffn size", model.moe_shared_expert_intermediate_size or 0, "TP", tp),
            ("layers", model.num_layers, "PP", pp),
        )
        if value % size
    ]
    if model.multi_latent_attention:  # megatron's local MLA splits its down projections over TP
        problems += [
            f"{what} ({value}) is not divisible by TP ({tp})"
            for what, value in (
                ("kv latent + rope width", d.kv_lora + d.rope_dim),
                ("q latent", d.q_lora or 0),
            )
            if value % tp
        ]
    elif (
        d.groups % tp and tp % d.groups
    ):  # fewer query groups than TP ranks: megatron replicates them
        problems.append(
            f"query groups ({d.groups}) is not divisible by TP ({tp}) and does not divide it"
        )
    if problems:
        raise ConversionError("the model does not fit the target layout: " + "; ".join(problems))


def plan_hf_to_megatron(hf_dir: Path, dtype: torch.dtype | None = None, tp: int = 1, pp: int = 1):
    """(model config, family, chunks, source) for converting `hf_dir` for a TP x PP run; reads no tensor data."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json")
    hf_config = _read_json(config_path)
    model = model_config_from_hf(hf_config, str(config_path))
    model.hf_architecture = hf_config["architectures"][0]
    family = FAMILIES[model.hf_architecture]
    source = SafetensorsFolder(hf_dir)
    d = Dims.of(model)
    mappings = needed_mappings(model, family, hf_moe.is_fused(source.weight_map))
    _check_hf_shapes(source, mappings, d, model)
    planned = {n for m in mappings for layer in layers_of(m, model) for n in hf_names(m, layer)}
    unplanned = sorted(
        n for n in set(source.weight_map) - planned if not n.endswith(_IGNORED_HF_SUFFIXES)
    )
    if unplanned:
        raise ConversionError(
            f"{hf_dir}: {len(unplanned)} tensor(s) have no megatron counterpart: {unplanned[:5]}"
        )
    check_target_layout(model, tp, pp)
    built = _LastBuilt()
    chunks = []
    for mapping in mappings:
        shape = megatron_shape(mapping, d)
        layout = _pieces(mapping, shape, model, tp)
        for layer in layers_of(mapping, model):
            names = hf_names(mapping, layer)
            stored = dtype or source.dtype(names[0])
            stage = tp_pieces.stage_of(mapping.megatron, layer, model.num_layers, pp)
            whole = _whole_tensor(mapping, layer, names, source, d, built)
            stacked = model.num_layers if layer is not None and stacked_layers(model) else None
            chunks += [
                _chunk(
                    layer_key(mapping, layer, model),
                    layer,
                    stacked,
                    shape,
                    piece,
                    stored,
                    whole,
                    tp_pieces.file_of(stage, piece.tp_rank, tp),
                )
                for piece in layout
            ]
    return model, family, chunks, source


def _pieces(mapping, shape: tuple[int, ...], model: ModelConfig, tp: int) -> list[tp_pieces.Piece]:
    """How to store one layer's tensor of `mapping`; routed experts whose MLP does not split over
    `tp` are stored one per chunk (they train with expert TP 1)."""
    split = tp_pieces.split_of(mapping.megatron, is_gated(model))
    if split.per_expert and shape[split.axis] % (tp * split.pieces_per_rank):
        tp = 1
    return tp_pieces.pieces(shape, split, tp)


class _LastBuilt:
    """The megatron tensor of the last (parameter, layer) built: its pieces are written in a row,
    so each tensor is built (and its Hugging Face tensors read) once, and one is held at a time."""

    def __init__(self):
        self.key, self.tensor = None, None

    def get(self, key, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key != self.key:
            self.key, self.tensor = None, None
            self.tensor, self.key = build(), key
        return self.tensor


def _whole_tensor(
    mapping, layer, names, source, d, built: _LastBuilt
) -> Callable[[], torch.Tensor]:
    """One layer's (or the whole) megatron tensor of `mapping`, built once for all its pieces."""
    return lambda: built.get(
        (mapping.megatron, layer), lambda: to_megatron(mapping, [source.get(n) for n in names], d)
    )


def _chunk(key, layer, num_layers, shape, piece, dtype, whole, file) -> global_view.Chunk:
    """One piece of a tensor; `num_layers`: the layer axis it is stacked on (None: a key of its own)."""

    def produce() -> torch.Tensor:
        tensor = whole()
        for dim, (start, length) in enumerate(zip(piece.offsets, piece.shape)):
            tensor = tensor.narrow(dim, start, length)
        return tensor.unsqueeze(0) if num_layers is not None else tensor

    if num_layers is None:
        return global_view.Chunk(key, piece.offsets, piece.shape, shape, dtype, produce, file)
    return global_view.Chunk(
        key, (layer, *piece.offsets), (1, *piece.shape), (num_layers, *shape), dtype, produce, file
    )


def hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[global_view.Chunk], None] = lambda c: None,
    overwrite: bool = False,
    tp: int = 1,
    pp: int = 1,
) -> Path:
    """Convert a Hugging Face folder into a megamft checkpoint folder (iteration 0).

    Stored for a run at TP=`tp` x PP=`pp`: each rank of such a run (or of one whose TP divides
    `tp`) reads its own shard only; any other layout loads it too, reading more.

    The folder is written beside `out_dir` and renamed into place when complete; an
    `out_dir` holding anything but an earlier conversion is refused unless `overwrite`.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_destination(out_dir, CONVERTED_OUTPUT, inputs=[hf_dir], overwrite=overwrite)
    model, _, chunks, source = plan_hf_to_megatron(hf_dir, dtype, tp, pp)
    cfg = MegamftConfig(model=model)
    common = {
        "progress": {"iteration": 0, "consumed_samples": 0},
        "config": json.dumps(to_dict(cfg)),
    }
    with written_beside(out_dir) as partial:
        copy_tokenizer(hf_dir, partial / "hf")
        shutil.copy2(hf_dir / "config.json", partial / "hf" / "config.json")
        path = global_view.write_checkpoint(partial, 0, chunks, common, on_written=progress)
        assert not source.unconsumed(), (
            source.unconsumed()
        )  # planned above: every source tensor is written
        (path / "megamft_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        (partial / "megamft_model.yaml").write_text(
            "# model section of the converted checkpoint; pass it to `megamft train --config`\n"
            + yaml.safe_dump({"model": asdict(model)}, sort_keys=False)
        )
        mark_output(partial, CONVERTED_OUTPUT, source=str(hf_dir.resolve()))
    return out_dir / path.name


# ---------------------------------------------------------------- megatron -> Hugging Face


def _checkpoint_dir(path: Path) -> Path:
    """An iteration folder, or a save folder resolved through its `latest` pointer."""
    from megamft.checkpoint.layout import complete_dir, latest_iteration

    if (path / "metadata.json").is_file():
        return path
    iteration = latest_iteration(path)
    if iteration is None:
        raise ConversionError(
            f"{path}: neither a checkpoint nor a folder with a 'latest' checkpoint"
        )
    return complete_dir(path, iteration)


def _base_weights(ckpt: Path) -> Path:
    """Where the non-adapter weights are: the checkpoint itself, or the base an adapter-only one names."""
    from megamft.checkpoint.dist_checkpoint import LORA_BASE, complete_dir

    base = global_view.read_common(ckpt).get(LORA_BASE)
    if base is None:
        return ckpt
    path = complete_dir(base["dir"], base["iteration"])
    if not (path / "metadata.json").is_file():
        raise ConversionError(
            f"{ckpt} holds LoRA adapters only; its base checkpoint {path} is missing"
        )
    return path


def _config_of_checkpoint(ckpt: Path) -> MegamftConfig:
    common = global_view.read_common(ckpt)
    return from_dict(json.loads(common["config"]), origin=str(ckpt / "common.pt"))


def megatron_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    hf_template: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    progress: Callable[[int], None] = lambda layer: None,
    overwrite: bool = False,
) -> Path:
    """Export a megamft checkpoint (any TP/PP it was trained with) as a Hugging Face folder.

    Never writes over the checkpoint, its base or the template; an `out_dir` holding anything
    but an earlier export is refused unless `overwrite`. Renamed into place when complete.
    The tokenizer files come from `hf_template`; their chat template is the one the training
    data was rendered with, when the checkpoint recorded it. A template that does not fit the
    model is refused (export_checks.check_template); megamft_source.json records the source.
    """
    checkpoint = pointed_checkpoint(
        checkpoint
    )  # <save_dir>/best or <save_dir>/latest: the folder it names
    ckpt = _checkpoint_dir(checkpoint)
    template = Path(hf_template) if hf_template else _default_template(checkpoint)
    base = global_view.read_common(ckpt).get("lora_base")
    check_destination(
        out_dir,
        HF_EXPORT_OUTPUT,
        inputs=[checkpoint, ckpt, template, base and base["dir"]],
        overwrite=overwrite,
    )
    cfg = _config_of_checkpoint(ckpt)
    model = cfg.model
    index = global_view.tensor_index(ckpt)
    family = _family_for_export(model)
    common = global_view.read_common(ckpt)
    chat_template = training_chat_template(common)
    if template:
        described = (
            f"--hf-template {template}" if hf_template else f"{template} (beside the checkpoint)"
        )
        check_template(
            template,
            described,
            hf_config_from_model(model, family, "float32"),
            model.vocab_size,
            chat_template,
            ckpt,
        )
    d = Dims.of(model)
    out_dir = Path(out_dir)
    with written_beside(out_dir) as partial:
        writer = _ShardWriter(partial, max_shard_bytes)
        stored_dtype = None
        mappings = needed_mappings(model, family)
        weights = _base_weights(ckpt)
        for layer in [None, *range(model.num_layers)]:
            group = [m for m in mappings if layer in layers_of(m, model)]
            regions = [_region(m, layer, d, model) for m in group]
            tensors = global_view.read_regions(weights, regions)
            stacked = layer is not None and stacked_layers(model)
            if stacked:  # LoRA is refused on models whose layers differ (config validation)
                tensors = lora_export.merged_layer(
                    ckpt, index, cfg, regions, tensors, from_base=weights != ckpt
                )
            for mapping, tensor in zip(group, tensors):
                tensor = tensor[0] if stacked else tensor
                stored_dtype = stored_dtype or tensor.dtype
                for name, value in zip(hf_names(mapping, layer), to_hf(mapping, tensor, d)):
                    writer.add(name, value.to(dtype or value.dtype).contiguous())
            if layer is not None:
                progress(layer)
                kill_point("export.layer", layer)
        writer.finish()
        dtype_name = str(dtype or stored_dtype).removeprefix("torch.")
        config = hf_config_from_model(model, family, dtype_name)
        if template and (template / "config.json").is_file():
            config = {**json.loads((template / "config.json").read_text()), **config}
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        if template:
            copy_tokenizer(template, partial)
        if (
            chat_template is not None
        ):  # prompts formatted as in training, not as the base model's template says
            write_chat_template(partial, chat_template)
        progress_state = common.get("progress", {})
        (partial / SOURCE_FILE).write_text(
            json.dumps(
                source_identity(ckpt, progress_state.get("iteration"), base, template), indent=2
            )
        )
        mark_output(partial, HF_EXPORT_OUTPUT, checkpoint=str(ckpt.resolve()))
    return out_dir


def megatron_to_peft(
    checkpoint: str | Path,
    out_dir: str | Path,
    hf_template: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the LoRA adapters of a megamft checkpoint as a PEFT adapter for the Hugging Face base
    (`hf_template`, or the hf/ folder a conversion left beside the base): adapter_config.json and
    adapter_model.safetensors (lora_export). Published like an export: complete or not at all."""
    ckpt = _checkpoint_dir(Path(checkpoint))
    base = global_view.read_common(ckpt).get("lora_base")
    template = (
        Path(hf_template)
        if hf_template
        else (
            _default_template(Path(checkpoint)) or (base and _default_template(Path(base["dir"])))
        )
    )
    check_destination(
        out_dir,
        lora_export.PEFT_ADAPTER_OUTPUT,
        inputs=[checkpoint, ckpt, base and base["dir"]],
        overwrite=overwrite,
    )
    cfg = _config_of_checkpoint(ckpt)
    with written_beside(Path(out_dir)) as partial:
        lora_export.write_peft_adapter(
            partial,
            ckpt,
            cfg,
            _family_for_export(cfg.model),
            str(template.resolve()) if template else None,
            dtype,
        )
        mark_output(partial, lora_export.PEFT_ADAPTER_OUTPUT, checkpoint=str(ckpt.resolve()))
    return Path(out_dir)


def _default_template(checkpoint: Path) -> Path | None:
    """The hf/ folder a conversion left beside the checkpoint, if any."""
    for folder in (checkpoint / "hf", checkpoint.parent / "hf"):
        if folder.is_dir():
            return folder
    return None


def _family_for_export(model: ModelConfig) -> Family:
    if model.hf_architecture in FAMILIES:
        return FAMILIES[model.hf_architecture]
    return FAMILIES["Qwen2ForCausalLM" if model.add_qkv_bias else "LlamaForCausalLM"]


def _region(mapping: Mapping, layer: int | None, d: Dims, model: ModelConfig) -> global_view.Region:
    shape = megatron_shape(mapping, d)
    if layer is None or not stacked_layers(model):
        return global_view.Region(layer_key(mapping, layer, model), (0,) * len(shape), shape)
    return global_view.Region(mapping.megatron, (layer,) + (0,) * len(shape), (1, *shape))


class _ShardWriter:
    """Collects tensors into safetensors shards of bounded size, then writes the index."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, int] = {}
        self.total_bytes = 0
        self.files: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self.files)
        file = f"model-{index + 1:05d}.safetensors"
        try:
            save_file(self.pending, self.folder / file, metadata={"format": "pt"})
        except SafetensorError as err:  # its I/O errors end with Rust's "(os error N)"
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(
                int(code.group(1)), os.strerror(int(code.group(1))), str(self.folder / file)
            ) from err
        self.files.append(file)
        for name in self.pending:
            self.weight_map[name] = index
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        total = len(self.files)
        names = {}
        for index, file in enumerate(self.files):
            final = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.folder / file, self.folder / final)
            names[index] = final
        index_json = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {name: names[i] for name, i in sorted(self.weight_map.items())},
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))

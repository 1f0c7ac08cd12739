"""megatron dist checkpoints that count only once complete.

Layout of a save folder:
    iter_0000040/          one complete dist checkpoint (which layouts load it: see sharding)
    latest                 text file naming the newest complete iteration
    best                   text file naming the best one by checkpoint.best_metric (checkpoint.keep_best)
A checkpoint is written to ``iter_XXXXXXX.partial`` and renamed when every rank
has finished, then ``latest`` is replaced atomically. A run killed mid-write
leaves only a ``.partial`` folder, which loading ignores; a save that fails or is
interrupted (Ctrl-C) removes its own (save_failures), and a full disk is one error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from megamft.checkpoint import global_view, sharding
from megamft.checkpoint.async_saves import AsyncSaves, write_in_background
from megamft.checkpoint.global_view import tensor_index
from megamft.checkpoint.layout import (
    BEST,
    CONFIG_FILE,
    DATA_IDENTITY_FILE,
    LATEST,
    CheckpointError,
    complete_dir,
    complete_iterations,
    iteration_dir,
    latest_iteration,
    write_atomically,
)
from megamft.checkpoint.save_failures import unfinished_removed
from megamft.compat.megatron_fixes import keeps_step_per_parameter
from megamft.config import MegamftConfig, to_dict
from megamft.model.chunks import bare_model, gather_parameters
from megamft.model.lora import ADAPTERS_ONLY
from megamft.model.moe import ROUTER_LOSS_FIELDS
from megamft.platform import distributed
from megamft.platform.kill_points import kill_point
from megamft.platform.output_folder import publish
from megamft.platform.signals import preemption_signals_deferred

log = logging.getLogger(__name__)
LORA_BASE = "lora_base"  # in an adapter-only checkpoint: where its base weights are
# Optimizer tensors; megatron prefixes each optimizer's keys with chained_<i>. when there are several (MoE).
_OPTIMIZER_KEY = re.compile(r"(chained_\d+\.)?optimizer\.")


def _layout() -> list:
    """What RNG states depend on: PP and TP sizes, and the platform (CUDA and CPU generator states differ)."""
    return [
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        "cuda" if torch.cuda.is_available() else "cpu",
    ]


def _rng_state() -> ShardedObject:
    """This rank's RNG streams (CPU, CUDA, megatron's tracker), one object per (PP, TP) position."""
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    position = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    return ShardedObject(
        "rng_state",
        state,
        tuple(_layout()[:2]),
        position,
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _adapters(model_state: dict) -> dict:
    return {k: v for k, v in model_state.items() if ".lora_" in k}


def _sharded_state(
    state,
    consumed_samples: int,
    iteration: int,
    cfg: MegamftConfig,
    loading: bool,
    optimizer_metadata: dict | None,
    extra: dict | None = None,
    with_rng: bool = False,
    adapters_only: bool = False,
):
    """The sharded state dict to save or load; the optimizer's (in `optimizer_metadata`'s format) unless None."""
    # Adapter-only: LoRA layers leave their base out (an NF4 one is not dequantized for nothing).
    metadata = {ADAPTERS_ONLY: True} if adapters_only else None
    model = {
        f"model{i}": bare_model(chunk).sharded_state_dict(metadata=metadata)
        for i, chunk in enumerate(state.chunks)
    }
    if adapters_only:  # the frozen base stays in its own checkpoint (`lora_base`)
        model = {name: _adapters(chunk_state) for name, chunk_state in model.items()}
    sharded = dict(model)
    if with_rng:
        sharded["rng_state"] = _rng_state()
        sharded["rng_layout"] = _layout()
    if optimizer_metadata is not None:
        # Nested per chunk: the chunks' local keys repeat ("decoder.layers.0...").
        sharded["optimizer"] = state.optimizer.sharded_state_dict(
            model, is_loading=loading, metadata=dict(optimizer_metadata)
        )
        sharded["scheduler"] = state.scheduler.state_dict()
        sharded[sharding.LAYOUT_KEY] = sharding.optimizer_layout(state.chunks)
    sharded.update(extra or {})
    sharded["progress"] = {"iteration": iteration, "consumed_samples": consumed_samples}
    sharded["config"] = json.dumps(to_dict(cfg))
    return sharded


def prune(save_dir: str | Path, keep_last: int, protected: set[int] = frozenset()) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never the ones `latest` and `best` name,
    nor `protected` ones, such as the base that adapter-only checkpoints read or those kept for their score)."""
    named = {latest_iteration(save_dir), _best_iteration(save_dir)}
    for iteration in complete_iterations(save_dir)[:-keep_last]:
        if iteration not in named and iteration not in protected:
            shutil.rmtree(iteration_dir(save_dir, iteration), ignore_errors=True)


def _best_iteration(save_dir: str | Path) -> int | None:
    """What `best` names; a pointer that names nothing complete protects nothing (and deletes nothing)."""
    try:
        return latest_iteration(save_dir, BEST)
    except RuntimeError:
        return None


def _check_nothing_needed_is_absent(
    path: Path, keys, adapters_may_be_absent: bool, base_may_be_absent: bool = False
) -> None:
    # Transformer Engine keeps layer metadata in `_extra_state`; checkpoints
    # converted from Hugging Face (or saved without TE) legitimately lack it.
    # A base checkpoint has no LoRA adapters when a LoRA fine-tune starts from it;
    # an adapter-only checkpoint has no base weights (they were loaded from the base).
    needed = sorted(
        k
        for k in keys
        if not k.endswith("_extra_state")
        and "_extra_state/" not in k
        and not (adapters_may_be_absent and ".lora_" in k)
        and not (base_may_be_absent and ".lora_" not in k)
    )
    # Ranks see different keys (only the last stage owns output_layer): agree before
    # raising, so that no rank waits forever in the next collective.
    failed = torch.tensor([1 if needed else 0])
    torch.distributed.all_reduce(failed, group=distributed.host_group())
    if failed.item() and not needed:
        raise CheckpointError(f"{path} does not match this model (reported on another rank)")
    if needed:
        raise CheckpointError(
            f"{path} does not match this model: {len(needed)} tensor(s) absent or unexpected, "
            f"e.g. {needed[:4]}; check the model section of the config against the checkpoint's "
            "megamft_config.json"
        )


def model_differences(saved_model: dict, cfg: MegamftConfig) -> list[str]:
    """Model fields whose saved value differs from this config's (fields unset on either side skipped:
    they are derived at start, e.g. model.vocab_size from the tokenizer)."""
    current = to_dict(cfg)["model"]
    return [
        f"model.{key}: checkpoint {saved_model.get(key)!r}, config {value!r}"
        for key, value in sorted(current.items())
        if value is not None
        and saved_model.get(key) is not None
        and saved_model.get(key) != value
        and key not in _SAME_WEIGHTS_FIELDS
    ]


# Fields that change how the weights are trained or computed, not what they mean: router-loss
# coefficients, and the attention kernels (every backend computes the same attention).
_SAME_WEIGHTS_FIELDS = (*ROUTER_LOSS_FIELDS, "attention_backend", "flash_attention_impl")


def _check_model_matches(path: Path, common: dict, cfg: MegamftConfig) -> None:
    """Stop before loading weights into a model they were not trained as.

    Tensor shapes catch only some differences: RoPE base or scaling, norm epsilon or
    a vocabulary within the same padded size load silently and train wrongly.
    """
    saved = json.loads(common["config"]).get("model", {}) if "config" in common else None
    if saved is None:
        return
    differences = model_differences(saved, cfg)
    if not differences:
        return
    if cfg.checkpoint.allow_config_change:
        if distributed.is_rank_zero_after_run():
            log.warning(
                "%s: loading into a changed model (checkpoint.allow_config_change=true): %s",
                path,
                "; ".join(differences),
            )
        return
    raise CheckpointError(
        f"{path} was saved with another model section; differs in: {'; '.join(differences)}. Use the "
        "checkpoint's model section (its megamft_config.json, or megamft_model.yaml of a conversion), or set "
        "checkpoint.allow_config_change=true if the change is deliberate"
    )


@contextlib.contextmanager
def _naming_damage(path: Path):
    """An unreadable checkpoint: one error naming it and what to do, not a bare EOFError from deep inside."""
    try:
        yield
    except (
        EOFError,
        OSError,
        pickle.UnpicklingError,
        RuntimeError,
        ValueError,
        KeyError,
        CheckpointException,
        CheckpointingException,
    ) as err:
        earlier = sorted(p.name for p in path.parent.glob("iter_*") if p.is_dir() and p != path)
        hint = f" (also here: {', '.join(earlier[-3:])})" if earlier else ""
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {str(err)[:300]}). If one of its files was cut short "
            f"or corrupted, load an earlier checkpoint with checkpoint.load_iteration=N{hint} or restore the "
            "folder from a copy; if it belongs to another model, check the model section"
        ) from err


def _create_empty_optimizer_state(optimizer) -> None:
    """Give every parameter zeroed optimizer state, as after a first step.

    megatron's distributed optimizer describes its state for loading from the
    state it holds, which the optimizer creates only on its first step. The
    loaded checkpoint then overwrites every value created here. Only torch's
    Adam keeps its step count per parameter (``state["step"]``); Transformer
    Engine's and apex's fused Adam keep it per param group, and TE's refuses
    any state name but its moments and master weights.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        if opt.init_state_fn is None or all(len(inner.state[p]) for p in params):
            continue  # (SGD without momentum state has nothing to create)
        opt.init_state_fn(inner, opt.config)
        if keeps_step_per_parameter(inner):
            for param in params:
                inner.state[param].setdefault("step", torch.tensor(0.0))


def _same_checkpoint(base: dict, folder: str | Path, iteration: int) -> bool:
    return Path(base["dir"]).resolve() == Path(folder).resolve() and base["iteration"] == iteration


# Helper processes this starts (writers, megatron's result-queue manager, async workers) inherit the
# block: a launcher that signals whole process groups cannot kill them mid-save.
@preemption_signals_deferred()
def save(
    state,
    save_dir: str | Path,
    iteration: int,
    consumed_samples: int,
    cfg: MegamftConfig,
    with_optimizer: bool = True,
    extra: dict | None = None,
    async_saves: AsyncSaves | None = None,
    lora_base: dict | None = None,
    data_identity: dict | None = None,
    keep: set[int] = frozenset(),
    best: int | None = None,
) -> Path:
    """Write a complete checkpoint for `iteration`; every rank must call this.

    with_optimizer=False writes weights only (the optimizer has no state before its first step).
    `extra` holds small replicated state (e.g. the loss balancer), saved by rank 0.
    With `async_saves`, tensors are written in the background and the checkpoint
    is published (renamed, `latest` moved) by a later `poll` or `wait`.
    With `lora_base` ({"dir", "iteration"} of the base weights), only adapters are
    saved (with their optimizer state); loading and export read the base from there.
    `data_identity` (data/identity.py), written as megamft_data.json, lets a resume tell whether its
    data is the data this run trained on.
    `keep`: iterations pruning must spare besides keep_last (those kept for their score); `best`: the
    iteration `<save_dir>/best` names once this checkpoint is published (when that one is complete).
    """
    final = iteration_dir(save_dir, iteration)
    partial = final.with_name(final.name + ".partial")
    rank = torch.distributed.get_rank()
    with unfinished_removed([partial], iteration, save_dir):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        torch.distributed.barrier()
        kill_point("save.started", iteration)
        if lora_base is not None:
            if _same_checkpoint(lora_base, save_dir, iteration):
                raise CheckpointError(
                    f"saving adapters only at iteration {iteration} in {save_dir} would replace their "
                    "base checkpoint; use another checkpoint.save_dir"
                )
            extra = {**(extra or {}), LORA_BASE: lora_base}
        gather_parameters(state.chunks)
        metadata = sharding.content_metadata(cfg) if with_optimizer else None
        sharded = _sharded_state(
            state,
            consumed_samples,
            iteration,
            cfg,
            False,
            metadata,
            extra,
            with_rng=with_optimizer,
            adapters_only=lora_base is not None,
        )

        def finish() -> None:
            if rank == 0:
                (partial / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2))
                if data_identity is not None:
                    (partial / DATA_IDENTITY_FILE).write_text(json.dumps(data_identity, indent=2))
                kill_point("save.written", iteration)
                publish(partial, final)
                kill_point("save.published", iteration)
                write_atomically(Path(save_dir) / LATEST, f"{iteration}\n")
                kill_point("save.pointed", iteration)
                if best is not None and complete_dir(save_dir, best).is_dir():
                    write_atomically(Path(save_dir) / BEST, f"{best}\n")
                if cfg.checkpoint.keep_last:
                    base_here = lora_base and _same_checkpoint(
                        lora_base, save_dir, lora_base["iteration"]
                    )
                    spared = ({lora_base["iteration"]} if base_here else set()) | set(keep)
                    prune(save_dir, cfg.checkpoint.keep_last, spared)

        if async_saves is not None:
            request = dist_checkpointing.save(
                sharded,
                str(partial),
                sharding.save_strategy(),
                async_sharded_save=True,
                content_metadata=metadata,
            )
            if request.async_fn is not None:
                request = request._replace(
                    async_fn=functools.partial(write_in_background, iteration, request.async_fn)
                )
            request.add_finalize_fn(finish)
            async_saves.schedule(request, partial, iteration, save_dir)
            return final
        dist_checkpointing.save(
            sharded, str(partial), sharding.save_strategy(), content_metadata=metadata
        )
        torch.distributed.barrier()
        finish()
        torch.distributed.barrier()
        return final


def load(
    state,
    load_dir: str | Path,
    cfg: MegamftConfig,
    load_optimizer: bool = True,
    iteration: int | None = None,
) -> dict:
    """Restore a complete checkpoint (the latest by default).

    Returns the checkpoint's replicated state: "progress", "config" and any `extra` saved with it,
    and "checkpoint": the folder and iteration loaded.
    """
    if iteration is None:
        iteration = latest_iteration(load_dir)
    if iteration is None:
        raise CheckpointError(
            f"no complete checkpoint in {load_dir} (no '{LATEST}' file): give the save folder "
            "of a run, or a conversion's output, as checkpoint.load_dir"
        )
    path = complete_dir(load_dir, iteration)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(
            f"{path} is not a complete megatron dist checkpoint (no metadata.json)"
        )
    with _naming_damage(path):
        stored = tensor_index(path)
        common = global_view.read_common(path)
    _check_model_matches(path, common, cfg)
    base = common.get(LORA_BASE)
    if base is not None:  # adapter-only: the frozen weights come from the base checkpoint first
        if _same_checkpoint(base, load_dir, iteration):
            raise CheckpointError(
                f"{path} holds adapters only and names itself as its base; its base weights are lost"
            )
        load(state, base["dir"], cfg, load_optimizer=False, iteration=base["iteration"])
    if load_optimizer and not any(_OPTIMIZER_KEY.match(k) for k in stored):
        raise CheckpointError(
            f"{path} holds weights only (e.g. converted from Hugging Face), no optimizer state; "
            "set checkpoint.load_optimizer=false to fine-tune from it"
        )
    if load_optimizer:
        sharding.check_loadable_at(path, stored, common, sharding.optimizer_layout(state.chunks))
        _create_empty_optimizer_state(state.optimizer)
    # RNG streams come back only into the layout that saved them (they are per TP/PP rank).
    saved_layout = common.get("rng_layout")
    if (
        saved_layout is not None and len(saved_layout) == 2
    ):  # saved before the platform was recorded: CPU
        saved_layout = [*saved_layout, "cpu"]
    same_layout = load_optimizer and saved_layout == _layout()
    metadata = sharding.saved_metadata(common) if load_optimizer else None
    sharded = _sharded_state(
        state,
        0,
        iteration,
        cfg,
        True,
        metadata,
        with_rng=same_layout,
        adapters_only=base is not None,
    )
    if not any(".lora_" in key for key in stored):  # a base model for a new LoRA fine-tune
        for name in [k for k in sharded if k.startswith("model")]:
            sharded[name] = {k: v for k, v in sharded[name].items() if ".lora_" not in k}
    with _naming_damage(path):
        loaded, _, absent = dist_checkpointing.load(
            sharded, str(path), sharding.load_strategy(path), strict=StrictHandling.RETURN_ALL
        )
    _check_nothing_needed_is_absent(path, absent, not load_optimizer)
    for i, chunk in enumerate(state.chunks):
        result = bare_model(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
        _check_nothing_needed_is_absent(
            path,
            result.missing_keys + result.unexpected_keys,
            not load_optimizer,
            base_may_be_absent=base is not None,
        )
    if load_optimizer:
        state.optimizer.load_state_dict(loaded["optimizer"])
        state.scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _restore_rng(loaded["rng_state"])
    else:
        # Mixed precision keeps fp32 master copies; refresh them from the new weights.
        state.optimizer.reload_model_params()
    loaded["checkpoint"] = {"dir": str(Path(load_dir).resolve()), "iteration": iteration}
    return loaded

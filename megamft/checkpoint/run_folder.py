"""A training run's save folder: which run it belongs to, and where a (re)started run starts from.

`plan_start` decides, before anything is built, what a run loads:
- ``checkpoint.resume=auto`` (default): the latest complete checkpoint in
  ``save_dir`` when there is one, so re-running the same command after a kill or
  a requeue continues the run; otherwise ``checkpoint.load_dir`` as a base
  (weights only), otherwise nothing.
- ``checkpoint.resume=never``: ``load_dir`` as configured (``load_optimizer``
  decides between a base and a resume), and ``save_dir`` must hold no
  checkpoints of this or another run unless ``checkpoint.overwrite=true``.
A save folder holding another run's checkpoints (different model, data, loss,
LoRA, seed or global batch) is refused: resuming it with other settings would
mix two runs. `check_save_folder` says so, listing the differences.

Preprocessed data is compared by content, not by path: every checkpoint records
the data's identity (megamft_data.json, data/identity.py), so data rebuilt in
place with other content is refused (the changed tasks and files listed) and the
same data moved elsewhere is accepted. Checkpoints or manifests from before
identities were recorded are compared by data.path.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from megamft.checkpoint.layout import (
    CONFIG_FILE,
    DATA_IDENTITY_FILE,
    complete_dir,
    complete_iterations,
    latest_iteration,
)
from megamft.config import MegamftConfig, to_dict
from megamft.config.loading import PATH_KEYS
from megamft.data.identity import data_identity, identity_differences
from megamft.data.manifest import DataIntegrityError, load_manifest
from megamft.platform.folder_lock import FolderLock
from megamft.platform.output_folder import (
    TRAINING_OUTPUT,
    DestinationError,
    check_destination,
    mark_output,
)
from megamft.sizing.memory import checkpoint_bytes

# What makes two runs the same run; everything else (steps, layout, intervals, paths) may change on resume.
_RUN_DEFINING = (
    "model",
    "data",
    "loss",
    "lora",
    "train.seed",
    "train.global_batch_size",
    "train.precision",
)
# Inside those, what may change between a run's restarts: the attention kernels compute the same model,
# and how thoroughly the data is checked changes no data.
_NOT_RUN_DEFINING = ("model.attention_backend", "model.flash_attention_impl", "data.verify")


@dataclass(frozen=True)
class StartPlan:
    """What this run loads before its first step."""

    load_dir: str | None
    iteration: int | None
    load_optimizer: bool
    reason: str


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and prefix.count(".") < 1:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _defining(flat: dict) -> dict:
    return {
        k: v
        for k, v in flat.items()
        if any(k == d or k.startswith(d + ".") for d in _RUN_DEFINING)
        and k not in _NOT_RUN_DEFINING
    }


def _absolute_paths(flat: dict) -> dict:
    """Folders as absolute paths: configs saved before load_config made them absolute hold them relative
    (to the working directory, taken to be this one)."""
    return {
        k: os.path.abspath(os.path.expanduser(v)) if k in PATH_KEYS and isinstance(v, str) else v
        for k, v in flat.items()
    }


def run_differences(
    saved: dict, current: MegamftConfig, data_by_content: bool = False
) -> list[str]:
    """Run-defining fields whose values differ, as 'field: saved -> now'.

    Fields unset on either side (None, derived at start such as model.vocab_size) are not compared;
    folders are compared as absolute paths. data_by_content: the data's identities are compared
    instead (data_differences), so data.path is not.
    """
    old, new = (_absolute_paths(_defining(_flatten(tree))) for tree in (saved, to_dict(current)))
    return [
        f"{key}: {old.get(key)!r} -> {value!r}"
        for key, value in sorted(new.items())
        if value is not None
        and old.get(key) is not None
        and old.get(key) != value
        and not (data_by_content and key == "data.path")
    ]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def current_data_identity(cfg: MegamftConfig) -> dict | None:
    """The identity of the preprocessed data this run reads (None: not preprocessed data, no checksums,
    or a folder that loading the data will report as damaged)."""
    if cfg.data.source != "indexed" or not cfg.data.path:
        return None
    try:
        return data_identity(load_manifest(cfg.data.path))
    except (DataIntegrityError, KeyError, TypeError):
        return None


def data_differences(saved_dir: Path, cfg: MegamftConfig) -> list[str] | None:
    """How this run's data differs from what the checkpoint in `saved_dir` trained on ([] if the same);
    None when that cannot be told by content (no identity recorded on either side)."""
    saved, now = _read_json(saved_dir / DATA_IDENTITY_FILE), current_data_identity(cfg)
    if saved is None or now is None:
        return None
    return [f"data content ({difference})" for difference in identity_differences(saved, now)]


def saved_config(save_dir: str | Path, iteration: int) -> dict | None:
    return _read_json(complete_dir(save_dir, iteration) / CONFIG_FILE)


def _is_training_folder(folder: Path) -> bool:
    return (folder / "latest").is_file() or any(p.is_dir() for p in folder.glob("iter_*"))


def check_save_folder(cfg: MegamftConfig) -> int | None:
    """Refuse a save_dir this run must not write; return its latest complete iteration (None if none)."""
    ckpt = cfg.checkpoint
    if not ckpt.save_dir:
        return None
    base = ckpt.load_dir if ckpt.load_dir and not _same(ckpt.load_dir, ckpt.save_dir) else None
    check_destination(
        ckpt.save_dir,
        TRAINING_OUTPUT,
        inputs=[base, cfg.data.path if cfg.data.source == "indexed" else None],
        overwrite=ckpt.overwrite,
        option="checkpoint.save_dir",
        recognise=_is_training_folder,
    )
    _check_writable(Path(ckpt.save_dir))
    latest = latest_iteration(ckpt.save_dir)
    _check_room(cfg, latest)
    if latest is None:
        return None
    saved = saved_config(ckpt.save_dir, latest)
    by_content = data_differences(complete_dir(ckpt.save_dir, latest), cfg)
    differences = run_differences(saved, cfg, by_content is not None) if saved is not None else []
    differences += by_content or []
    if differences and not (ckpt.overwrite or ckpt.allow_config_change):
        raise DestinationError(
            f"checkpoint.save_dir {ckpt.save_dir} holds another run's checkpoints (latest iteration {latest}), "
            f"which differs in: {'; '.join(differences)}. Resume it with its settings, or choose another "
            "checkpoint.save_dir (checkpoint.allow_config_change=true resumes it anyway, "
            "checkpoint.overwrite=true starts a new run over it)"
        )
    if ckpt.resume == "never" and not ckpt.overwrite and not _same(ckpt.load_dir, ckpt.save_dir):
        raise DestinationError(
            f"checkpoint.save_dir {ckpt.save_dir} already holds this run's checkpoints (latest iteration {latest}) "
            "and checkpoint.resume=never would start again over them. Use checkpoint.resume=auto to continue "
            "it, another checkpoint.save_dir, or checkpoint.overwrite=true"
        )
    return latest


def _check_writable(folder: Path) -> None:
    """Find an unwritable save_dir now, not at the first save hours later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".megamft-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise DestinationError(
            f"checkpoint.save_dir {folder} cannot be written ({err.strerror}); choose a "
            "folder this user can write, on a file system with room for checkpoints"
        ) from None


def saves_ahead(cfg: MegamftConfig, start: int) -> int:
    """Checkpoints a run starting after step `start` writes if nothing stops it: one every
    checkpoint.save_interval steps, and one at the end unless the last step is one of those; with
    checkpoint.keep_best, also one at each measurement of checkpoint.best_metric (at most)."""
    steps, interval = cfg.train.train_steps, cfg.checkpoint.save_interval
    if steps <= start:
        return 0
    regular = (
        steps // interval - start // interval + (1 if steps % interval else 0) if interval else 1
    )
    measured = measurement_interval(cfg) if cfg.checkpoint.keep_best else 0
    return regular + (steps // measured - start // measured if measured else 0)


def measurement_interval(cfg: MegamftConfig) -> int:
    """Steps between measurements of checkpoint.best_metric (0: only at the end of training)."""
    return (
        cfg.eval.interval
        if cfg.checkpoint.best_metric.startswith("eval/")
        else cfg.train.eval_interval
    )


def new_checkpoints_at_once(cfg: MegamftConfig, start: int, existing: int) -> int:
    """The most checkpoints this run adds to the `existing` complete ones in save_dir at one time.

    A save writes its `.partial` folder beside the complete ones, publishes it and only then
    prunes down to keep_last, sparing the keep_best checkpoints kept for their score, so save_dir
    peaks at max(existing, keep_last + keep_best) + 1 checkpoints.
    With async_save the next save may start while the previous one is being written: one
    more (writes are assumed to end within one save_interval). keep_last=0 keeps every save
    of this run. A save on a preemption signal ends the run before its next regular save, so
    never more than `saves_ahead` in all. The checkpoints already there take no new room.
    """
    ckpt = cfg.checkpoint
    ahead = saves_ahead(cfg, start)
    if not ckpt.keep_last:
        return ahead
    kept = ckpt.keep_last + ckpt.keep_best
    return min(ahead, max(kept - existing, 0) + 1 + (1 if ckpt.async_save else 0))


def _check_room(cfg: MegamftConfig, latest: int | None) -> None:
    """Refuse a save_dir without room for every checkpoint this run will hold there at once."""
    folder = Path(cfg.checkpoint.save_dir)
    plan = plan_start(cfg, latest)
    start = (plan.iteration or 0) if plan.load_optimizer else 0
    count = new_checkpoints_at_once(cfg, start, len(complete_iterations(folder)))
    # The vocabulary may be known only once the data is read; an unknown one adds little here.
    one = checkpoint_bytes(cfg, cfg.model.vocab_size or 256)
    free = shutil.disk_usage(folder).free
    if free < count * one:
        raise DestinationError(
            f"checkpoint.save_dir {folder} has {free / 2**30:.1f} GiB free, less than the {count} new "
            f"checkpoint(s) this run keeps there at once need (about {one / 2**30:.1f} GiB each; "
            f"checkpoint.keep_last={cfg.checkpoint.keep_last}, keep_best={cfg.checkpoint.keep_best}, "
            f"async_save={cfg.checkpoint.async_save}); free space, lower checkpoint.keep_last or keep_best, or "
            "choose another folder"
        )


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def plan_start(cfg: MegamftConfig, latest_in_save_dir: int | None) -> StartPlan:
    """Where this run starts from (see the module docstring)."""
    ckpt = cfg.checkpoint
    if ckpt.resume == "auto":
        if latest_in_save_dir is not None and not ckpt.overwrite:
            rollback = _same(ckpt.load_dir, ckpt.save_dir) and ckpt.load_iteration is not None
            iteration = ckpt.load_iteration if rollback else latest_in_save_dir
            return StartPlan(
                ckpt.save_dir,
                iteration,
                True,
                f"resuming {ckpt.save_dir} at iteration {iteration} (checkpoint.resume=auto)",
            )
        if ckpt.load_dir:
            return StartPlan(
                ckpt.load_dir,
                ckpt.load_iteration,
                False,
                f"starting from the weights of {ckpt.load_dir} (a base: no optimizer state)",
            )
        return StartPlan(None, None, False, "starting from initial weights")
    if ckpt.load_dir:
        return StartPlan(
            ckpt.load_dir,
            ckpt.load_iteration,
            ckpt.load_optimizer,
            f"loading {ckpt.load_dir} ({'resume' if ckpt.load_optimizer else 'weights only'})",
        )
    return StartPlan(None, None, False, "starting from initial weights")


def claim(cfg: MegamftConfig) -> tuple[FolderLock | None, StartPlan]:
    """Check save_dir, lock it for this run, mark it as a training folder, and plan the start.

    Raises DestinationError (nothing written) when the folder must not be used.
    """
    latest = check_save_folder(cfg)
    lock = None
    if cfg.checkpoint.save_dir:
        lock = FolderLock(cfg.checkpoint.save_dir, "training run").acquire()
        mark_output(cfg.checkpoint.save_dir, TRAINING_OUTPUT)
    return lock, plan_start(cfg, latest)


def tokenizer_mismatch(data_manifest: dict, checkpoint_dir: str | Path) -> str | None:
    """Why the data's tokenizer is not the model's, or None (also when it cannot be told).

    A converted checkpoint keeps its model's tokenizer files in `hf/`; a training run's
    folder keeps none, so its base (if converted) is where the tokenizer is found.
    """
    from megamft.data.tokenizer import file_sha256

    used = data_manifest.get("tokenizer", {})
    if "sha256" not in used or "file" not in used:
        return None  # e.g. the byte tokenizer: no file to compare
    model_file = Path(checkpoint_dir) / "hf" / used["file"]
    if not model_file.is_file():
        return None
    if file_sha256(model_file) == used["sha256"]:
        return None
    return (
        f"the data was tokenized with another {used['file']} than the model's ({model_file}); re-run "
        f"megamft-preprocess with --tokenizer {model_file}, or set checkpoint.allow_config_change=true "
        "if the change is deliberate"
    )

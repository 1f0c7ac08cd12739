"""Checks of a preprocessed data folder before training reads it.

megatron-core's IndexedDataset trusts its files: a truncated .bin is only
found when a batch reaches the missing bytes, as a numpy error naming no file.
Here every task's three .bin/.idx pairs are checked against the manifest
first (present, sizes consistent with their index, sample and token counts
equal to the manifest's), and any problem is one error naming the file and
what to do. Their content is checked against the checksums the manifest
recorded by verify.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megamft.data.indexed import DamagedIndex, IndexInfo, read_index
from megamft.data.manifest import DataIntegrityError, rerun_hint


def _damaged(folder: Path, file: Path, problem: str) -> DataIntegrityError:
    return DataIntegrityError(
        f"{file}: {problem}. The data folder is damaged or mixes two runs; {rerun_hint(folder)}"
    )


def check_pair(folder: Path, prefix: str, dtype, documents: int, tokens: int) -> IndexInfo:
    """One .bin/.idx pair against what the manifest says it holds."""
    idx, bin_ = folder / f"{prefix}.idx", folder / f"{prefix}.bin"
    try:
        info = read_index(idx)
    except FileNotFoundError:
        raise _damaged(folder, idx, "missing") from None
    except (OSError, DamagedIndex) as err:
        raise _damaged(folder, idx, getattr(err, "strerror", None) or str(err)) from None
    if np.dtype(info.dtype) != np.dtype(dtype):
        raise _damaged(
            folder,
            idx,
            f"holds {np.dtype(info.dtype).name} values, the manifest says {np.dtype(dtype).name}",
        )
    held = int(info.lengths.sum(dtype=np.int64))
    if len(info.lengths) != documents or held != tokens:
        raise _damaged(
            folder,
            idx,
            f"indexes {len(info.lengths)} samples of {held} tokens, "
            f"the manifest says {documents} samples of {tokens} tokens",
        )
    if not bin_.is_file():
        raise _damaged(folder, bin_, "missing")
    size = bin_.stat().st_size
    if size != info.bin_bytes:
        what = "truncated" if size < info.bin_bytes else "longer than its index says"
        raise _damaged(
            folder, bin_, f"{size} bytes, but its index {idx.name} needs {info.bin_bytes}: {what}"
        )
    return info


def check_task(folder: Path, entry: dict, token_dtype: str) -> None:
    """A task's tokens, loss mask and task ids: whole, and agreeing with each other and the manifest."""
    documents, tokens = int(entry["documents"]), int(entry["tokens"])
    ids = check_pair(folder, entry["prefix"], token_dtype, documents, tokens)
    mask = check_pair(folder, entry["loss_mask_prefix"], np.uint8, documents, tokens)
    check_pair(folder, entry["task_id_prefix"], np.uint16, documents, documents)
    if not np.array_equal(ids.lengths, mask.lengths):
        raise _damaged(
            folder,
            folder / f"{entry['loss_mask_prefix']}.idx",
            f"its sample lengths differ from those of {entry['prefix']}.idx",
        )


def largest_token_id(folder: Path, entry: dict, token_dtype: str) -> int:
    """The task's largest token id: from the manifest, or read from the .bin for older outputs."""
    if "max_token_id" in entry:
        return int(entry["max_token_id"])
    path = folder / f"{entry['prefix']}.bin"
    if path.stat().st_size == 0:
        return -1
    return int(np.memmap(path, dtype=np.dtype(token_dtype), mode="r").max())

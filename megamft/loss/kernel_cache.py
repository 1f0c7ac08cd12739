"""Built torch extensions kept in folders named after what they were built from.

    key = build_key(sources, settings)             # sources' bytes + settings (torch, CUDA, flags...)
    folder = build_folder(root, name, key)         # root/<name>-<key>
    module = load_built(folder, key)               # None unless folder holds a complete build of key
    module = build_locked(folder, key, build)      # build(folder) -> module, one builder at a time

A folder holds a complete build when its record ``megamft-build.json`` names
the key and the library's sha256. The record is removed before a build and
written only after the built module imported, so a build killed at any point
leaves no folder that looks complete. ``load_built`` imports the recorded
library directly: no compiler, ninja or CUDA toolkit is needed to use a
prebuilt folder, so an image can carry one; a changed source or setting gives
another key, hence another folder, and a rebuild.

``build_locked`` builds under a ``BuildLock`` (one builder at a time, stale
locks of killed builders taken over). Holding it, it removes torch's own build
lock (``TORCH_BATON``) where torch's is a FileBaton, whose mere existence
blocks (torch/utils/cpp_extension.py ``_jit_compile`` up to torch 2.13): only a
builder holding the BuildLock ever creates it, so one found then was left by a
killed build, and torch would wait for its removal forever. From torch 2.14 on
that file is an OS advisory lock (filelock), released when its holder dies, and
is left alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable

from megamft.platform.build_lock import STALE_AFTER_S, BuildLock

log = logging.getLogger(__name__)
RECORD = "megamft-build.json"
# torch.utils.cpp_extension._jit_compile: FileBaton(os.path.join(build_directory, 'lock')), created with
# O_CREAT | O_EXCL before the build and removed after it; load() of a folder holding it waits for its removal.
# torch >= 2.14 takes FileLock(the same path) instead: an flock the kernel releases, the file left in place.
TORCH_BATON = "lock"
ROOT_ENV = "MEGAMFT_KERNELS_DIR"


def default_root() -> Path:
    """$MEGAMFT_KERNELS_DIR, else $TORCH_EXTENSIONS_DIR/megamft, else ~/.cache/megamft/kernels."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "megamft"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "megamft" / "kernels"


def build_key(sources: Iterable[Path], settings: dict) -> str:
    """16 hex digits of the sha256 of the settings and of every source's name and bytes."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in sources:
        digest.update(hashlib.sha256(path.name.encode()).digest())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def build_folder(root: str | Path | None, name: str, key: str) -> Path:
    return Path(root if root is not None else default_root()).expanduser() / f"{name}-{key}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _import(library: Path) -> ModuleType:
    """Import an extension library as torch's load() does (module name: the file name up to its first dot)."""
    spec = importlib.util.spec_from_file_location(library.name.split(".")[0], library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_built(folder: str | Path, key: str) -> ModuleType | None:
    """The module of the complete build of `key` in `folder`; None when there is none."""
    folder = Path(folder)
    record = read_record(folder)
    if record is None or record.get("key") != key or not isinstance(record.get("library"), str):
        return None
    library = folder / record["library"]
    try:
        if _sha256(library) != record.get("sha256"):
            return None
    except OSError:
        return None
    return _import(library)


def _write_record(folder: Path, key: str, library: Path, settings: dict | None) -> None:
    record = {
        "key": key,
        "library": library.name,
        "sha256": _sha256(library),
        "settings": settings or {},
        "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "built_by": f"pid {os.getpid()} on {socket.gethostname()}",
    }
    partial = folder / f"{RECORD}.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, folder / RECORD)


def torch_lock_blocks_when_left() -> bool:
    """Whether torch's JIT build lock is a FileBaton, which a killed build leaves blocking (torch <= 2.13)."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


def _clear_torch_baton(folder: Path, lock: BuildLock) -> None:
    baton = folder / TORCH_BATON
    if not baton.exists() or not torch_lock_blocks_when_left():
        return
    left_by = f" ({lock.stale_owners[-1]})" if lock.stale_owners else ""
    log.warning("%s: removed torch's build lock, left by a killed build%s", baton, left_by)
    baton.unlink(missing_ok=True)


def build_locked(
    folder: str | Path,
    key: str,
    build: Callable[[Path], ModuleType],
    settings: dict | None = None,
    stale_after_s: float = STALE_AFTER_S,
    poll_s: float = 1.0,
) -> ModuleType:
    """build(folder) under the folder's BuildLock, recorded as complete; a build finished meanwhile is loaded."""
    folder = Path(folder)
    with BuildLock(folder, stale_after_s=stale_after_s, poll_s=poll_s) as lock:
        module = load_built(folder, key)
        if module is not None:
            return module
        (folder / RECORD).unlink(missing_ok=True)
        _clear_torch_baton(folder, lock)
        module = build(folder)
        _write_record(folder, key, Path(module.__file__), settings)
        return module

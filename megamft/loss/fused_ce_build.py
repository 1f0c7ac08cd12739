"""Building and loading the fused cross-entropy CUDA extension (csrc/fused_ce.cu, csrc/fused_ce_binding.cpp).

    module = build_extension()   # load the build for this machine's settings, building it first if needed
    module = load_extension()    # load it only (KernelsNotBuilt when it was not built)

The build goes to a folder of its own under the kernels root (``$MEGAMFT_KERNELS_DIR``,
else ``$TORCH_EXTENSIONS_DIR/megamft``, else ``~/.cache/megamft/kernels``), named
after the sources' bytes and the build settings: torch and CUDA versions, Python
version, compiler flags and CUDA architectures (``TORCH_CUDA_ARCH_LIST``, else
the visible GPUs', as torch picks them). A complete build there is imported as
it is, without a CUDA toolkit (see megamft.loss.kernel_cache); otherwise the
toolkit is checked (``toolkit_problem``) and torch's ``cpp_extension.load``
builds with ninja under the folder's build lock, one builder at a time, a lock
left by a killed build cleared (megamft.platform.build_lock).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from megamft.loss import kernel_cache

EXTENSION_NAME = "megamft_fused_ce"
SOURCES = ("fused_ce.cu", "fused_ce_binding.cpp")
EXTRA_CFLAGS = ("-O3",)
EXTRA_CUDA_CFLAGS = ("-O3",)


class ToolkitMissing(RuntimeError):
    """The CUDA toolkit, ninja or a matching CUDA version is missing (the message says which)."""


class KernelsNotBuilt(RuntimeError):
    """No complete build of the extension for this machine's settings in its folder."""


def source_dir() -> Path:
    """The folder holding the CUDA sources: the installed package data, else the repo's csrc/."""
    try:
        from importlib.resources import files

        installed = Path(str(files("megamft._csrc")))
        if all((installed / name).is_file() for name in SOURCES):
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "csrc"


def toolkit_problem() -> str | None:
    """Why the extension cannot be built here (None when nvcc, CUDA_HOME and ninja look right)."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build; install a CUDA build of torch"
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not nvcc.exists():
        return (
            f"no CUDA toolkit found (nvcc / CUDA_HOME; CUDA_HOME={cuda_home!r}): install the CUDA "
            f"{torch.version.cuda.split('.')[0]}.x toolkit (nvcc) matching torch.version.cuda="
            f"{torch.version.cuda} and set CUDA_HOME to it"
        )
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed: pip install ninja"
    try:
        out = subprocess.run(
            [str(nvcc), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not run {nvcc} --version: {exc}"
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        return f"could not read the CUDA version from {nvcc} --version"
    if found.group(1) != torch.version.cuda.split(".")[0]:
        return (
            f"the CUDA toolkit at {cuda_home} is {found.group(1)}.{found.group(2)} but torch was built "
            f"with CUDA {torch.version.cuda}: install a CUDA {torch.version.cuda.split('.')[0]}.x toolkit "
            f"(or a torch built for CUDA {found.group(1)}) and point CUDA_HOME at it"
        )
    return None


def arch_flags() -> list[str]:
    """The -gencode flags torch's build will use: TORCH_CUDA_ARCH_LIST, else the visible GPUs' architectures."""
    from torch.utils import cpp_extension

    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if wanted in ("", "native") and torch.cuda.device_count() == 0:
        raise ToolkitMissing(
            toolkit_problem()
            or "no GPU is visible to pick the CUDA architectures from: set "
            "TORCH_CUDA_ARCH_LIST (9.0+PTX for H100, what a build on one picks)"
        )
    try:
        return sorted(cpp_extension._get_cuda_arch_flags())
    except ValueError as exc:
        raise ToolkitMissing(f"TORCH_CUDA_ARCH_LIST={wanted!r}: {exc}") from exc


def build_settings() -> dict:
    """Everything besides the sources that the built library depends on (its folder's key covers both)."""
    if torch.version.cuda is None:
        raise ToolkitMissing(toolkit_problem())
    return {
        "extension": EXTENSION_NAME,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cflags": list(EXTRA_CFLAGS),
        "cuda_cflags": list(EXTRA_CUDA_CFLAGS),
        "arch": arch_flags(),
    }


def _target(build_directory, sources, root) -> tuple[Path, Path, str, dict]:
    """(sources folder, build folder, key, settings)."""
    folder = Path(sources) if sources is not None else source_dir()
    settings = build_settings()
    key = kernel_cache.build_key([folder / name for name in SOURCES], settings)
    target = (
        Path(build_directory)
        if build_directory is not None
        else kernel_cache.build_folder(root, EXTENSION_NAME, key)
    )
    return folder, target, key, settings


def kernel_folder(root: str | Path | None = None) -> Path:
    """Where the build for this machine's settings goes under `root` (default: the kernels root)."""
    return _target(None, None, root)[1]


def build_extension(
    verbose: bool = False,
    build_directory: str | Path | None = None,
    sources: Path | None = None,
    root: str | Path | None = None,
) -> ModuleType:
    """Load the extension, building it first when its folder holds no complete build; raises on any problem.

    ToolkitMissing: what to install (no complete build and no toolkit, ninja, or matching CUDA);
    any other exception: the build failed. `build_directory` replaces the keyed folder under
    `root`. The one build call: kernels(), training's start-up, `megamft build-kernels` and
    .ci/build_cuda_extension.sh use it.
    """
    folder, target, key, settings = _target(build_directory, sources, root)
    module = kernel_cache.load_built(target, key)
    if module is not None:
        return module
    problem = toolkit_problem()
    if problem is not None:
        raise ToolkitMissing(problem + _other_builds(target, settings))
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelsNotBuilt(
            f"no build of the kernels for these settings in {target.parent}, and it cannot be "
            f"built there ({exc.strerror}): set MEGAMFT_KERNELS_DIR to a writable folder"
            f"{_other_builds(target, settings)}"
        ) from exc

    def build(directory: Path) -> ModuleType:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(folder / name) for name in SOURCES],
            extra_cflags=list(EXTRA_CFLAGS),
            extra_cuda_cflags=list(EXTRA_CUDA_CFLAGS),
            verbose=verbose,
            build_directory=str(directory),
        )

    return kernel_cache.build_locked(target, key, build, settings)


def _other_builds(target: Path, settings: dict) -> str:
    """A note naming the builds beside `target` made for other settings (why a prebuilt one was not used)."""
    notes = []
    for sibling in sorted(target.parent.glob(f"{EXTENSION_NAME}-*")):
        built = (kernel_cache.read_record(sibling) or {}).get("settings")
        if sibling != target and isinstance(built, dict):
            differ = [
                f"{name} {built.get(name)} (here {value})"
                for name, value in settings.items()
                if built.get(name) != value
            ]
            notes.append(f"{sibling.name}: {', '.join(differ) or 'other sources'}")
    return f"; {target.parent} holds builds for other settings: {'; '.join(notes)}" if notes else ""


def load_extension(
    build_directory: str | Path | None = None,
    sources: Path | None = None,
    root: str | Path | None = None,
) -> ModuleType:
    """The extension as built by build_extension (same arguments); never builds: KernelsNotBuilt if absent."""
    _, target, key, _ = _target(build_directory, sources, root)
    module = kernel_cache.load_built(target, key)
    if module is None:
        raise KernelsNotBuilt(f"no complete build of the fused cross-entropy kernels in {target}")
    return module


def first_lines(error: BaseException, count: int = 12) -> str:
    """The head of a build error: its first line and the compiler's error lines."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    errors = [
        line for line in lines[1:] if re.search(r"error|undefined|fatal|no such file", line, re.I)
    ]
    picked = [lines[0]] + (errors or lines[1:])[: count - 1]
    return "\n".join(line[:300] for line in picked)


def failure_reason(error: BaseException) -> str:
    """What to say about a failed build or load: the missing piece, or the build's first error lines."""
    if isinstance(error, (ToolkitMissing, KernelsNotBuilt)):
        return str(error)
    return f"the build failed:\n{first_lines(error)}"

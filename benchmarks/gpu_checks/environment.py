"""The environment check: versions, GPU, megamft and its CUDA sources, read by a probe in a child process."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .context import Context
from .process import ENTRY_SCRIPT, ROOT, last_error, run_cmd

PROBE_MARK = "GPU_CHECK_JSON "


def check_environment(ctx: Context, rec: dict) -> list:
    cmd = [ctx.python, str(ENTRY_SCRIPT), "_probe"]
    result = run_cmd(cmd, ctx.work / "logs" / "environment.log", ctx.timeout(90), ctx.env())
    rec["details"]["probe"] = result.brief()
    problems = []
    probe = {}
    for line in result.output.splitlines():
        if line.startswith(PROBE_MARK):
            probe = json.loads(line[len(PROBE_MARK) :])
    if not probe:
        return [f"environment probe failed (exit {result.rc}): {last_error(result.output)}"]
    versions = {
        k: probe.get(k)
        for k in (
            "python",
            "torch",
            "torch_cuda",
            "cudnn",
            "numpy",
            "triton",
            "megatron_core",
            "transformers",
            "tensorboard",
            "pytest",
            "safetensors",
            "tokenizers",
            "sentencepiece",
        )
    }
    versions.update(_git_info())
    versions.update(
        megamft_path=probe.get("megamft_path"),
        megamft_csrc=probe.get("megamft_csrc"),
        nvcc=_nvcc_version(),
        ninja=shutil.which("ninja"),
        executable=probe.get("executable"),
        platform=probe.get("platform"),
    )
    gpu = {
        k: probe.get(k)
        for k in ("cuda_available", "device_count", "name", "memory_gb", "capability")
    }
    gpu["nvidia_smi"] = _nvidia_smi()
    with ctx.report.lock:
        ctx.report.data["versions"] = versions
        ctx.report.data["gpu"] = gpu
    ctx.cuda = bool(probe.get("cuda_available"))
    for key in ("torch", "megatron_core", "megamft_path"):
        if not probe.get(key):
            problems.append(f"{key} not importable: {probe.get(key + '_error', '?')}")
    if not ctx.dry:
        if not ctx.cuda:
            problems.append(
                "torch.cuda.is_available() is False on a GPU run (use --dry-run on a CPU machine)"
            )
        if not probe.get("megamft_csrc"):
            problems.append(
                "megamft._csrc (the CUDA sources) is not importable: install megamft, not just its "
                f"source tree ({probe.get('megamft_csrc_error')})"
            )
        if not versions["nvcc"]:
            problems.append("nvcc not found: the fused kernels are built just in time with it")
        if not versions["ninja"]:
            problems.append("ninja not found: torch's just-in-time extension build needs it")
    return problems


def probe() -> None:
    """Child process (`gpu_check.py _probe`): what is installed and which GPU is there, as one JSON line."""
    import importlib.metadata
    import importlib.util

    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
    }
    for dist in (
        "numpy",
        "triton",
        "transformers",
        "tensorboard",
        "pytest",
        "safetensors",
        "tokenizers",
        "sentencepiece",
    ):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    try:
        import torch

        info.update(
            torch=torch.__version__,
            torch_cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            cuda_available=torch.cuda.is_available(),
        )
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                device_count=torch.cuda.device_count(),
                name=props.name,
                memory_gb=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}",
            )
    except Exception as err:  # noqa: BLE001 - reported, not raised
        info["torch_error"] = repr(err)
    try:
        import megatron.core

        info["megatron_core"] = getattr(
            megatron.core, "__version__", None
        ) or importlib.metadata.version("megatron-core")
    except Exception as err:  # noqa: BLE001
        info["megatron_core_error"] = repr(err)
    try:
        import megamft

        info["megamft_path"] = str(Path(megamft.__file__).parent)
        spec = importlib.util.find_spec("megamft._csrc")
        if spec is None:
            info["megamft_csrc_error"] = "no module megamft._csrc"
        else:
            folder = Path(list(spec.submodule_search_locations)[0])
            info["megamft_csrc"] = str(folder) if (folder / "fused_ce.cu").is_file() else None
    except Exception as err:  # noqa: BLE001
        info.setdefault("megamft_path_error", repr(err))
        info.setdefault("megamft_csrc_error", repr(err))
    print(PROBE_MARK + json.dumps(info), flush=True)


def _git_info() -> dict:
    info = {"megamft_commit": None, "megamft_dirty": None}
    if shutil.which("git") and (ROOT / ".git").exists():
        try:
            head = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            if head.returncode == 0:
                info["megamft_commit"] = head.stdout.strip()
                status = subprocess.run(
                    ["git", "-C", str(ROOT), "status", "--porcelain", "--", "megamft", "csrc"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                info["megamft_dirty"] = (
                    bool(status.stdout.strip()) if status.returncode == 0 else None
                )
        except (OSError, subprocess.SubprocessError):
            pass
    # Identifies the code even where the checkout has no .git (a copied working tree).
    digest = hashlib.sha256()
    files = sorted([*(ROOT / "megamft").rglob("*.py"), *(ROOT / "csrc").glob("*")])
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    info["megamft_source_sha256"] = digest.hexdigest()[:16]
    return info


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).exists()), None
    )
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return nvcc
    release = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return f"{release.group(2)} ({nvcc})" if release else nvcc


def _nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return repr(err)

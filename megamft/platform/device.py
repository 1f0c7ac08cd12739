"""Which accelerators and optional GPU libraries this process can use."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    """What this process found at start-up."""

    cuda: bool
    transformer_engine: bool
    apex: bool

    @property
    def backend(self) -> str:
        """torch.distributed backend: nccl on GPUs, gloo on the CPU."""
        return "nccl" if self.cuda else "gloo"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def detect() -> Runtime:
    """Probe CUDA, Transformer Engine and apex without importing them heavily."""
    cuda = torch.cuda.is_available()
    return Runtime(
        cuda=cuda,
        transformer_engine=cuda and _installed("transformer_engine"),
        apex=cuda and _installed("apex"),
    )


def describe_runtime(runtime: Runtime) -> str:
    """One line for the log."""
    if not runtime.cuda:
        return "device: CPU (megatron-core GPU paths emulated, gloo backend)"
    extras = [name for name, on in (("Transformer Engine", runtime.transformer_engine),
                                    ("apex", runtime.apex)) if on]
    return (
        f"device: {torch.cuda.get_device_name()} x{torch.cuda.device_count()} "
        f"(nccl; {', '.join(extras) if extras else 'local spec, no TE/apex'})"
    )

"""Which accelerators and optional GPU libraries this process can use."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

TE_REBUILD_HINT = (
    "rebuild it against this torch (pip install --no-build-isolation 'transformer_engine[pytorch]', "
    "after torch), use a container that ships both, or uninstall it"
)


@dataclass(frozen=True)
class Runtime:
    """What this process found at start-up."""

    cuda: bool
    transformer_engine: bool
    apex: bool
    transformer_engine_problem: str | None = None
    """Why an installed Transformer Engine is not used (it does not import), else None."""

    @property
    def backend(self) -> str:
        """torch.distributed backend: nccl on GPUs, gloo on the CPU."""
        return "nccl" if self.cuda else "gloo"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def transformer_engine_import_problem() -> str | None:
    """Why an installed Transformer Engine fails to import; None when it is absent or imports.

    A TE built against another torch fails with an undefined symbol, one missing CUDA
    libraries with an OSError. megatron-core 0.16.1 cannot even be imported then: its
    tensor_parallel/random.py catches only ModuleNotFoundError around ``import
    transformer_engine``. So the CLIs ask this before anything imports megatron-core.
    """
    if not _installed("transformer_engine"):
        return None
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - whatever a broken build raises, said in one line
        return f"{type(err).__name__}: {str(err)[:300]}"
    return None


def transformer_engine_status() -> tuple[bool, str | None]:
    """(usable, problem): Transformer Engine is usable exactly when megatron-core says so.

    megatron-core records whether TE and its own TE extension imported as
    ``gpt_layer_specs.HAVE_TE`` and builds placeholders where they did not, so an
    installed TE is not taken as present from its files alone. `problem` says why an
    installed TE is not usable.
    """
    if not _installed("transformer_engine"):
        return False, None
    problem = transformer_engine_import_problem()
    if problem is not None:
        return False, problem
    from megatron.core.models.gpt import gpt_layer_specs

    if not gpt_layer_specs.HAVE_TE:
        return False, "megatron-core could not import its Transformer Engine extension"
    return True, None


def broken_transformer_engine_message() -> str | None:
    """One line for the CLIs when an installed Transformer Engine does not import, else None."""
    problem = transformer_engine_import_problem()
    if problem is None:
        return None
    return (
        f"Transformer Engine is installed but does not import ({problem}); megatron-core cannot start "
        f"with it: {TE_REBUILD_HINT}"
    )


def detect() -> Runtime:
    """Probe CUDA, Transformer Engine and apex (each as megatron-core itself decides)."""
    cuda = torch.cuda.is_available()
    usable, problem = transformer_engine_status() if cuda else (False, None)
    apex = False
    if cuda and _installed("apex"):
        from megatron.core.models.gpt import gpt_layer_specs

        apex = gpt_layer_specs.HAVE_APEX
    return Runtime(
        cuda=cuda, transformer_engine=usable, apex=apex, transformer_engine_problem=problem
    )


def describe_runtime(runtime: Runtime) -> str:
    """One line for the log."""
    if not runtime.cuda:
        return "device: CPU (megatron-core GPU paths emulated, gloo backend)"
    extras = [
        name
        for name, on in (("Transformer Engine", runtime.transformer_engine), ("apex", runtime.apex))
        if on
    ]
    line = (
        f"device: {torch.cuda.get_device_name()} x{torch.cuda.device_count()} "
        f"(nccl; {', '.join(extras) if extras else 'local spec, no TE/apex'})"
    )
    if runtime.transformer_engine_problem:
        line += (
            f"; Transformer Engine is installed but does not import ({runtime.transformer_engine_problem}): "
            f"not used; {TE_REBUILD_HINT}"
        )
    return line

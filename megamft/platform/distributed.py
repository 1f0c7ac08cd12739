"""Start and stop torch.distributed and megatron-core's parallel state."""

from __future__ import annotations

import datetime
import os

import torch

from megamft.config import MegamftConfig
from megamft.platform import cpu_emulation, megatron_fixes
from megamft.platform.device import Runtime, detect


def world_size_from_env() -> int:
    """World size as torchrun (or the test launcher) sets it; 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(cfg: MegamftConfig) -> Runtime:
    """Create the process group and megatron's TP/PP/CP/DP groups, then seed.

    Every group times out after parallel.distributed_timeout_minutes.

    Runs plain ``python`` too: without torchrun it becomes a world of one.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    runtime = detect()
    timeout = datetime.timedelta(minutes=cfg.parallel.distributed_timeout_minutes)
    megatron_fixes.apply()
    if not runtime.cuda:
        cpu_emulation.enable()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if runtime.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=runtime.backend, timeout=timeout)
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        distributed_timeout_minutes=p.distributed_timeout_minutes,
    )
    model_parallel_cuda_manual_seed(cfg.train.seed)
    global _host_group, _runtime
    _host_group = torch.distributed.new_group(backend="gloo", timeout=timeout)
    _runtime = runtime
    return runtime


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """What `initialize` found in this process."""
    if _runtime is None:
        raise RuntimeError("megamft.platform.distributed.initialize() has not run in this process")
    return _runtime


_host_group = None


def host_group():
    """A gloo group of every rank, for small host-side agreements (a flag, a count).

    NCCL takes device tensors only; agreeing on a host value over it would need a
    copy to the GPU and a synchronizing read back. Over gloo the value stays on
    the host and the GPU's queue of work is not waited for.
    """
    if _host_group is None:
        raise RuntimeError("megamft.platform.distributed.initialize() has not run in this process")
    return _host_group


def shutdown() -> None:
    """Tear down megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    global _host_group
    _host_group = None
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_logging_rank() -> bool:
    """The rank that prints and writes logs: the last pipeline stage of DP/TP rank 0.

    The loss exists only on the last pipeline stage, so that is where we report it.
    """
    from megatron.core import parallel_state

    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def is_rank_zero_after_run() -> bool:
    """Global rank 0, read from the environment (the process group may be gone)."""
    return int(os.environ.get("RANK", "0")) == 0

"""Start and stop torch.distributed and megatron-core's parallel state."""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch

from megamft.config import MegamftConfig
from megamft.platform import cpu_emulation, megatron_fixes
from megamft.platform.device import Runtime, detect

DEVICE_MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"
log = logging.getLogger("megamft")


def world_size_from_env() -> int:
    """World size as torchrun (or the test launcher) sets it; 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port no process listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_rank() -> int:
    """This process's rank on its node, as torchrun sets it; 0 when run plainly."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def needs_one_device_connection(cfg: MegamftConfig) -> bool:
    """Whether the layout needs CUDA_DEVICE_MAX_CONNECTIONS=1.

    TP and CP overlap their communication with computation by launching the collective just
    before the kernel it should overlap: megatron-core's
    LinearWithGradAccumulationAndAsyncCommunication.backward (tensor_parallel/layers.py) relies
    on CUDA_DEVICE_MAX_CONNECTIONS=1 to have the sequence-parallel all-gather, the input-gradient
    all-reduce and the reduce-scatter scheduled before the weight-gradient GEMM. With one
    hardware queue kernels start in launch order; with several the GEMM can start first, and
    nothing overlaps.
    Megatron-LM's own trainer requires it for TP > 1 or CP > 1 (megatron/training/arguments.py,
    validate_args).
    """
    return cfg.parallel.tensor_model_parallel_size > 1 or cfg.parallel.context_parallel_size > 1


def set_device_max_connections(cfg: MegamftConfig) -> str | None:
    """Set CUDA_DEVICE_MAX_CONNECTIONS=1 where the layout needs it and the environment does not say.

    CUDA reads it when it starts, so this must run before the process's first CUDA call
    (torchrun's workers and SLURM's tasks all pass through here). Returns a warning when the
    variable is set to another value, or was set here after CUDA had started.
    """
    if not needs_one_device_connection(cfg):
        return None
    given = os.environ.get(DEVICE_MAX_CONNECTIONS)
    if given is not None and given != "1":
        return (f"{DEVICE_MAX_CONNECTIONS}={given} is set, but tensor/context parallelism overlaps its "
                "communication only with 1; unset it (megamft sets 1 where the layout needs it)")
    if given is None:
        os.environ[DEVICE_MAX_CONNECTIONS] = "1"
        if torch.cuda.is_initialized():
            return (f"{DEVICE_MAX_CONNECTIONS}=1 was set after CUDA started in this process, too late to take "
                    "effect; export it before starting the workers")
    return None


def initialize(cfg: MegamftConfig) -> Runtime:
    """Create the process group and megatron's TP/PP/CP/DP groups, then seed.

    Every group times out after parallel.distributed_timeout_minutes.

    Runs plain ``python`` too: without torchrun it becomes a world of one. First of all, before
    any CUDA call, sets CUDA_DEVICE_MAX_CONNECTIONS=1 where the layout needs it.
    """
    problem = set_device_max_connections(cfg)
    if problem and os.environ.get("RANK", "0") == "0":
        log.warning("%s", problem)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    runtime = detect()
    timeout = datetime.timedelta(minutes=cfg.parallel.distributed_timeout_minutes)
    megatron_fixes.apply()
    if not runtime.cuda:
        cpu_emulation.enable()
    if not torch.distributed.is_initialized():
        if "MASTER_PORT" not in os.environ and world_size_from_env() == 1:
            # A plain single-process run: a port of its own, so two runs on one machine never collide.
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if runtime.cuda:
            torch.cuda.set_device(local_rank())
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

"""Start and stop torch.distributed and megatron-core's parallel state."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time

import torch

from megamft.config import MegamftConfig
from megamft.emulation import cpu_emulation
from megamft.errors import ReportedByAnotherRank, UserError
from megamft.platform.device import Runtime, detect
from megamft.platform.signals import helpers_die_with_this_process

DEVICE_MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"
log = logging.getLogger("megamft")

FIRST_FAILURE_KEY = "megamft/first_failure"
"""The job store's key naming the first rank to fail (see claim_report)."""
RANK_ZERO_FIRST_S = 0.5
"""How long a non-zero rank waits before claiming a user error, so that one every rank finds is rank 0's."""


class PortInUse(UserError, RuntimeError):
    """MASTER_PORT is taken by another process."""


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
        return (
            f"{DEVICE_MAX_CONNECTIONS}={given} is set, but tensor/context parallelism overlaps its "
            "communication only with 1; unset it (megamft sets 1 where the layout needs it)"
        )
    if given is None:
        os.environ[DEVICE_MAX_CONNECTIONS] = "1"
        if torch.cuda.is_initialized():
            return (
                f"{DEVICE_MAX_CONNECTIONS}=1 was set after CUDA started in this process, too late to take "
                "effect; export it before starting the workers"
            )
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
    helpers_die_with_this_process()  # a trainer killed outright leaves no helper behind
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
        _init_process_group(runtime.backend, timeout)
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


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    try:
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    except torch.distributed.DistNetworkError as err:
        if "EADDRINUSE" not in str(err):  # the code name torch's socket layer reports
            raise
        port = os.environ["MASTER_PORT"]
        advice = (
            "unset MASTER_PORT (a single process then takes a free port) or set a free one"
            if world_size_from_env() == 1
            else "set a free MASTER_PORT for every rank"
        )
        raise PortInUse(
            f"MASTER_PORT={port} is in use by another process on this machine (another run?): "
            f"{advice}"
        ) from None


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


def claim_report(err: Exception) -> Exception | None:
    """Which rank of the job reports `err`: None when this one does, else the quiet error to raise instead.

    The first rank to fail records itself in the job's store (torchrun's agent store, or rank 0's): it
    reports, and a later rank stays silent (ReportedByAnotherRank: its own error is most often the broken
    connection to the first) unless its error is a user mistake other than the first one's: a file
    damaged on its node is not the config error rank 0 found. A user error this rank reports is marked
    with the rank. Call it before the process group is torn down, so that the ranks that see this one
    leave find why it left. A non-zero rank waits a moment before claiming a user error, so that one
    every rank finds is said by rank 0.
    """
    if world_size_from_env() == 1 or not torch.distributed.is_initialized():
        return None
    rank = torch.distributed.get_rank()
    user = isinstance(err, UserError)
    if user and rank != 0:
        time.sleep(RANK_ZERO_FIRST_S)
    mine = json.dumps([rank, user, str(err)])
    try:
        first = _first_failure(mine)
    except (
        RuntimeError,
        KeyError,
        ValueError,
    ):  # the store left with rank 0, which held it (no torchrun)
        if not user:
            return ReportedByAnotherRank(
                0, False
            )  # this rank's error is most likely rank 0 leaving
        first = mine  # in doubt, say the mistake this rank found
    first_rank, first_user, first_message = json.loads(first)
    if first == mine or (user and (not first_user or first_message != str(err))):
        if user:
            err.rank = rank
        return None
    return ReportedByAnotherRank(first_rank, first_user)


def _first_failure(mine: str) -> str:
    """Record `mine` as the job's first failure unless one is recorded; the one recorded."""
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=2),
    )
    key = f"{FIRST_FAILURE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # per torchrun attempt
    return store.compare_set(key, "", mine).decode()

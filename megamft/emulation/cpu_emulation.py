"""Run megatron-core's GPU code paths on a CPU, under the gloo backend.

megatron-core assumes CUDA in a handful of places: ``device='cuda'`` and
``torch.cuda.current_device()`` as allocation targets, the CUDA RNG tracker
used for tensor-parallel weight init and dropout, streams and events, and
type checks such as ``grad.type() == 'torch.cuda.FloatTensor'``. This module
redirects exactly those touch points to the CPU so that the *real*
megatron-core code (tensor, pipeline and data parallelism, the distributed
optimizer, dist checkpointing) runs unchanged on a laptop or a CI box.

Limit: a TorchFunctionMode is suspended while it handles a call, so Python
code that autograd runs from inside an intercepted ``torch.autograd.backward``
sees no redirection. megatron's schedules avoid that path when
``deallocate_pipeline_outputs=True`` (megamft's default): they call the C++
engine directly. ``current_device()`` answers a CPU device so that the common
``device=torch.cuda.current_device()`` allocations need no redirection at all.

It switches itself on only when CUDA is absent (``enable_if_no_cuda``) and
refuses to run on a machine with a GPU, so the GPU path is never altered.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch
from torch.overrides import TorchFunctionMode

from megamft.emulation import strict_device

log = logging.getLogger(__name__)

_enabled = False
_strict = False


def is_enabled() -> bool:
    """True once the emulation is active in this process."""
    return _enabled


def enable_if_no_cuda() -> bool:
    """Enable the emulation when this process has no usable CUDA device.

    Returns whether the emulation is active afterwards.
    """
    if not torch.cuda.is_available():
        enable()
    return _enabled


def enable(strict: bool | None = None) -> None:
    """Patch torch.cuda and megatron-core's RNG tracker; redirect CUDA allocations.

    `strict` (default: on unless MEGAMFT_STRICT_DEVICE=0) keeps emulated GPU
    tensors apart from host tensors as a real GPU would (see strict_device).
    """
    global _enabled, _strict
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megamft CPU emulation must not run on a machine with CUDA")
    _strict = strict_device.requested() if strict is None else strict
    _patch_torch_cuda()
    _patch_megatron_rng()
    # Entered for the life of the process: every later allocation goes through them.
    _CudaToCpuMode().__enter__()
    if _strict:
        strict_device.patch_collectives()
        strict_device.StrictDeviceMode().__enter__()
    _enabled = True
    log.debug(
        "CUDA not available: megatron-core runs on the CPU through megamft's emulation (strict=%s)",
        _strict,
    )


def is_strict() -> bool:
    """True when emulated GPU tensors are kept apart from host tensors."""
    return _enabled and _strict


def sync_count() -> int:
    """Device-to-host synchronizations so far (strict mode; 0 otherwise)."""
    return strict_device.sync_count() if is_strict() else 0


def emulated_device() -> torch.device:
    """What a CUDA device spec becomes: the tagged stand-in under strict mode, else the CPU."""
    return strict_device.EMULATED_GPU if _strict else torch.device("cpu")


def _as_cpu_device(device):
    """Map a CUDA device spec (index, 'cuda', 'cuda:1', torch.device) to the emulated device."""
    if isinstance(device, bool):  # bool is an int subclass; never a device
        return device
    if isinstance(device, int):
        return emulated_device()
    if isinstance(device, str) and device.startswith("cuda"):
        return emulated_device()
    if isinstance(device, torch.device) and device.type == "cuda":
        return emulated_device()
    return device


def _plain_cpu(device):
    """The device argument for the actual call: moves are done by strict_device.move."""
    if isinstance(device, bool) or not strict_device.is_gpu_device(device):
        return device
    return torch.device("cpu")


def _cuda_type_name(cpu_name: str) -> str:
    # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor', as megatron's checks expect.
    if cpu_name.startswith("torch.") and not cpu_name.startswith("torch.cuda."):
        return "torch.cuda." + cpu_name[len("torch.") :]
    return cpu_name


_NEW_METHODS = {
    torch.Tensor.new_tensor,
    torch.Tensor.new_zeros,
    torch.Tensor.new_ones,
    torch.Tensor.new_empty,
    torch.Tensor.new_full,
}
_DEVICE_GETTER = torch.Tensor.device
_IS_CUDA_GETTER = torch.Tensor.is_cuda
_IS_CPU_GETTER = torch.Tensor.is_cpu


def _call(func, args, kwargs):
    return func(*args, **kwargs)


def _getter(func):
    return getattr(func, "__self__", None) if getattr(func, "__name__", "") == "__get__" else None


def _backward_with(mode, func, args, kwargs) -> None:
    """Tensor.backward / autograd.backward with the mode kept on for the Python code backward runs.

    A mode is off while it handles a call; here the engine is called directly
    inside the mode instead, as megatron's schedules do.
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
    if func is torch.Tensor.backward:
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs")
        kwargs = {"grad_tensors" if k == "gradient" else k: v for k, v in kwargs.items()}
    bound = {**dict(zip(names, args)), **kwargs}
    tensors = bound["tensors"]
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _make_grads(
        tensors,
        _tensor_or_tensors_to_tuple(bound.get("grad_tensors"), len(tensors)),
        is_grads_batched=False,
    )
    create_graph = bool(bound.get("create_graph"))
    retain_graph = bound.get("retain_graph")
    inputs = bound.get("inputs")
    inputs = (
        () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    )
    with mode:
        _engine_run_backward(
            tensors,
            grads,
            create_graph if retain_graph is None else retain_graph,
            create_graph,
            inputs,
            allow_unreachable=True,
            accumulate_grad=True,
        )


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call; under strict mode, moves and tags."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type:
            return self._tensor_type(func, args, kwargs)
        if _strict:
            return self._strict(func, args, kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _as_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if (
            func is torch.Tensor.to
        ):  # t.to(device), t.to("cuda"), t.to(0): device given positionally
            args = tuple(_as_cpu_device(a) if not isinstance(a, torch.Tensor) else a for a in args)
        return func(*args, **kwargs)

    def _strict(self, func, args, kwargs):
        getter = _getter(func)
        if getter is _DEVICE_GETTER:
            return strict_device.REPORTED_GPU if strict_device.on_gpu(args[0]) else func(*args)
        if getter is _IS_CUDA_GETTER:
            return strict_device.on_gpu(args[0])
        if getter is _IS_CPU_GETTER:
            return not strict_device.on_gpu(args[0])
        if func is torch.Tensor.get_device:
            return 0 if strict_device.on_gpu(args[0]) else -1
        if func is torch.Tensor.cuda:
            return strict_device.move(
                func,
                args,
                {"non_blocking": kwargs.get("non_blocking", False)},
                "gpu",
                lambda f, a, k: a[0],
            )
        if func is torch.Tensor.cpu:
            return strict_device.move(func, args, kwargs, "host", _call)
        if func is torch.Tensor.to:
            target = strict_device._target_of_to(args, kwargs)
            kwargs = {k: _plain_cpu(v) if k == "device" else v for k, v in kwargs.items()}
            args = tuple(_plain_cpu(a) if not isinstance(a, torch.Tensor) else a for a in args)
            return strict_device.move(func, args, kwargs, target, _call)
        if strict_device.is_read(func):
            return strict_device.read(func, args, kwargs, _call)
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            return _backward_with(self, func, args, kwargs)
        on_gpu = None  # the side the caller named, if any
        if kwargs.get("device") is not None:
            on_gpu = strict_device.is_gpu_device(kwargs["device"])
            kwargs["device"] = strict_device.EMULATED_GPU if on_gpu else kwargs["device"]
        elif func in _NEW_METHODS:
            on_gpu = strict_device.on_gpu(args[0])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        out = func(*args, **kwargs)
        if on_gpu is not None and isinstance(out, torch.Tensor):
            # e.g. torch.tensor(data, device="cuda"), torch.empty_like(gpu_tensor, device="cpu");
            # as_tensor(t, device=...) may return t itself: the other side needs a copy, as on a GPU.
            source = next((a for a in args if isinstance(a, torch.Tensor) and a is out), None)
            if source is not None and strict_device.on_gpu(source) != on_gpu:
                return strict_device.move(
                    func, (source,), {}, "gpu" if on_gpu else "host", lambda f, a, k: a[0]
                )
            strict_device.set_on_gpu(out, on_gpu)
        return out

    @staticmethod
    def _tensor_type(func, args, kwargs):
        """t.type(): CUDA names for GPU tensors (megatron checks them); a CUDA type string moves to the GPU."""
        dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
        if dtype is None:
            name = func(args[0])
            return _cuda_type_name(name) if not _strict or strict_device.on_gpu(args[0]) else name
        if not isinstance(dtype, str):
            return func(args[0], dtype, **{k: v for k, v in kwargs.items() if k != "dtype"})
        target = "gpu" if dtype.startswith("torch.cuda.") else "host"
        plain = dtype.replace("torch.cuda.", "torch.")
        call = lambda f, a, k: func(a[0], plain, **{k2: v for k2, v in k.items() if k2 != "dtype"})  # noqa: E731
        if not _strict:
            return call(func, args, kwargs)
        return strict_device.move(func, args[:1], kwargs, target, call)


class _NoOpStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NoOpEvent:
    """Stands in for torch.cuda.Event; elapsed times are not measured on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _seed_cpu_generator(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # megatron allocates with device=torch.cuda.current_device() everywhere,
    # also inside autograd backward functions, where our TorchFunctionMode is
    # not active (a mode is suspended while it handles the backward call).
    # Answering a CPU device makes those allocations correct on their own.
    cuda.current_device = emulated_device
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.current_stream = lambda device=None: _NoOpStream()
    cuda.default_stream = lambda device=None: _NoOpStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    # t.record_stream(torch.cuda.current_stream()) (megatron's MoE dispatcher) fails in argument
    # parsing, before any TorchFunctionMode sees it, when the stream is a stand-in.
    if not getattr(torch.Tensor.record_stream, "_megamft_emulated", False):
        record_stream = torch.Tensor.record_stream

        def _record_stream(tensor, stream):
            return None if isinstance(stream, _NoOpStream) else record_stream(tensor, stream)

        _record_stream._megamft_emulated = True
        torch.Tensor.record_stream = _record_stream
    if _strict:  # bytes held by emulated GPU tensors
        cuda.memory_allocated = strict_device.memory_allocated
        cuda.max_memory_allocated = strict_device.max_memory_allocated
        cuda.memory_reserved = strict_device.memory_allocated
        cuda.reset_peak_memory_stats = strict_device.reset_peak_memory_stats
    else:
        cuda.memory_allocated = lambda device=None: 0
        cuda.max_memory_allocated = lambda device=None: 0
        cuda.memory_reserved = lambda device=None: 0
        cuda.reset_peak_memory_stats = lambda device=None: None
    # One generator backs both "devices": the CPU default generator.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = _seed_cpu_generator
    cuda.manual_seed_all = _seed_cpu_generator
    cuda.random = types.SimpleNamespace(
        get_rng_state=cuda.get_rng_state, set_rng_state=cuda.set_rng_state
    )


class _DropRngContextWarning(logging.Filter):
    # With one generator for CPU and "CUDA", megatron's fork() sees the CPU state
    # move inside every fork and warns each time; the move is expected here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state
    logging.getLogger(mcore_random.__name__).addFilter(_DropRngContextWarning())

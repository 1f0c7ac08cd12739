"""Strict device emulation: which CPU tensors stand for GPU memory, enforced as CUDA would.

Under the CPU emulation every tensor is a CPU tensor, so a host tensor that
reaches a GPU kernel, an NCCL collective or a GPU parameter goes unnoticed
until the first run on a real machine. Strict mode keeps the two apart:

- A tensor is an *emulated GPU tensor* when its storage carries a tag. Tags are
  set where CUDA memory would be allocated: ``device="cuda"``, ``.cuda()``,
  ``.to(device)``, ``device=torch.cuda.current_device()`` (which answers
  ``EMULATED_GPU``, a CPU device with index 1, so even allocations inside
  autograd's backward are seen), and every op output computed from a tagged
  input. ``.cpu()`` of a tagged tensor is a real copy without the tag.
- Tags live on the storage object (its Python object lives as long as the
  storage), so views, ``nn.Parameter`` wrapping and ``param.data = ...`` keep
  them, and a freed storage can never pass its tag to a new one.
- A ``TorchDispatchMode`` sees every aten op, also those autograd runs in
  backward, and raises CUDA's device-mismatch error when a tagged tensor meets
  a host tensor that is not a 0-dim scalar (which CUDA accepts).
- Collectives on groups that are NCCL on a GPU machine refuse host tensors with
  NCCL's error; groups created with ``backend="gloo"`` (megatron's host-side
  groups) take them as before.
- Every device-to-host synchronization of a tagged tensor (``.item()``,
  ``bool(t)``, ``.tolist()``, ``.cpu()``, printing, data-dependent shapes such
  as ``nonzero``) is counted: each one stalls a real GPU.
- Bytes held by tagged storages are counted, so ``torch.cuda.memory_allocated``
  and ``max_memory_allocated`` measure emulated device memory.

Why a dispatch mode and not a tensor subclass: a subclass must survive
megatron's flat parameter buffers, gloo, dist checkpointing and pickling, each of
which unwraps or rebuilds plain tensors; tags on storages need none of that.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

STRICT_ENV = "MEGAMFT_STRICT_DEVICE"
EMULATED_GPU = torch.device("cpu", 1)
REPORTED_GPU = torch.device("cuda", 0)
MISMATCH = (
    "Expected all tensors to be on the same device, but found at least two devices, "
    "cuda:0 and cpu! (when checking argument for {op})"
)
NCCL_HOST_TENSOR = "No backend type associated with device type cpu"

_TAG = "_megamft_on_gpu"
_aten = torch.ops.aten


def requested() -> bool:
    """Strict mode unless MEGAMFT_STRICT_DEVICE=0 (the documented switch)."""
    return os.environ.get(STRICT_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


# ---- tags -------------------------------------------------------------------------------------------------


class _Stats:
    syncs = 0
    live_bytes = 0
    peak_bytes = 0


_local = threading.local()


class _Allocation:
    """The tag: bytes this storage holds on the emulated GPU.

    Referenced only by its storage, so it is freed, and its bytes released,
    when the storage is (or when the tag is removed).
    """

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        _Stats.live_bytes += nbytes
        if _Stats.live_bytes > _Stats.peak_bytes:
            _Stats.peak_bytes = _Stats.live_bytes

    def __del__(self):
        try:
            _Stats.live_bytes -= self.nbytes
        except (AttributeError, TypeError):  # interpreter shutdown
            pass


def _tagged(tensor) -> bool:
    # Callers run with torch functions disabled: `.device` would answer the emulated one.
    try:
        return getattr(tensor.untyped_storage(), _TAG, None) is not None
    except (
        RuntimeError,
        NotImplementedError,
        AttributeError,
    ):  # sparse and other storage-less tensors
        return False


def on_gpu(tensor: torch.Tensor) -> bool:
    """True for a tensor that stands for GPU memory."""
    if not isinstance(tensor, torch.Tensor):
        return False
    with torch._C.DisableTorchFunction():
        return _tagged(tensor)


def _tag(storage) -> None:
    if getattr(storage, _TAG, None) is None:
        setattr(storage, _TAG, _Allocation(storage.nbytes()))


def set_on_gpu(tensor: torch.Tensor, value: bool) -> torch.Tensor:
    """Tag (or untag) the tensor's storage; tagged bytes count as device memory."""
    with torch._C.DisableTorchFunction():
        storage = tensor.untyped_storage()
    if value:
        _tag(storage)
    elif getattr(storage, _TAG, None) is not None:
        setattr(storage, _TAG, None)
    return tensor


@contextlib.contextmanager
def _thread_flag(name: str):
    before = getattr(_local, name, False)
    setattr(_local, name, True)
    try:
        yield
    finally:
        setattr(_local, name, before)


def host_outputs():
    """Inside: op outputs are not tagged (a copy being made for the host)."""
    return _thread_flag("host_outputs")


def count_sync() -> None:
    if not getattr(_local, "quiet", False):
        _Stats.syncs += 1


def sync_count() -> int:
    """Device-to-host synchronizations of emulated GPU tensors so far in this process."""
    return _Stats.syncs


def memory_allocated(device=None) -> int:
    return _Stats.live_bytes


def max_memory_allocated(device=None) -> int:
    return _Stats.peak_bytes


def reset_peak_memory_stats(device=None) -> None:
    _Stats.peak_bytes = _Stats.live_bytes


def quiet_syncs():
    """Inside: synchronizations are not counted (one print is one sync, not one per element)."""
    return _thread_flag("quiet")


def is_gpu_device(device) -> bool:
    """Does this device argument name (emulated) GPU memory?"""
    if isinstance(device, bool) or device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda") or device == "cpu:1"
    if isinstance(device, torch.device):
        return device.type == "cuda" or device == EMULATED_GPU
    return False


# ---- the dispatch mode --------------------------------------------------------------------------------------


def _tensors(value, out: list) -> list:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors(item, out)
    return out


# Ops that legitimately take tensors of both devices.
_MIXED_OK = {
    _aten.copy_.default,
    _aten._to_copy.default,
    _aten.lift_fresh.default,
    _aten.detach.default,
    _aten.alias.default,
    _aten._copy_from.default,
    _aten._copy_from_and_resize.default,
    _aten._has_compatible_shallow_copy_type.default,
    _aten.is_same_size.default,
    _aten.set_.source_Storage,
    _aten.set_.source_Storage_storage_offset,
    _aten.set_.source_Tensor,
    _aten.set_.default,
}
# Indexing accepts host index tensors into a device tensor.
_INDEXING = {
    _aten.index.Tensor,
    _aten.index_put_.default,
    _aten.index_put.default,
    _aten._index_put_impl_.default,
}
# Outputs whose shape depends on the data: the host must wait for the device.
_DATA_DEPENDENT = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.masked_select.default,
    _aten.repeat_interleave.Tensor,
    _aten.equal.default,
    _aten.bincount.default,
}


def _describe(tensor: torch.Tensor) -> str:
    where = "cuda:0" if _tagged(tensor) else "cpu"
    return f"{where} {str(tensor.dtype).replace('torch.', '')}{list(tensor.shape)}"


def _mismatch(func, tensors=()) -> RuntimeError:
    # CUDA's message, then what megamft knows beyond it: which operands were where.
    detail = (
        f" [megamft strict emulation; operands: {', '.join(map(_describe, tensors))}]"
        if tensors
        else ""
    )
    return RuntimeError(
        MISMATCH.format(op=f"{func.__name__} in method wrapper_CUDA_{func.__name__}") + detail
    )


def _check_mixing(func, args, kwargs) -> bool:
    """Raise CUDA's error where GPU and host tensors meet; return whether any input is on the GPU."""
    tensors = _tensors(list(args) + list(kwargs.values()), [])
    tagged = [_tagged(t) for t in tensors]
    if not any(tagged):
        return False
    if func in _MIXED_OK:
        return True
    if func in _INDEXING:  # self and values (not the indices) must agree
        self_on_gpu = _tagged(args[0])
        indices = _tensors(args[1], []) if len(args) > 1 else []
        if not self_on_gpu and any(_tagged(i) for i in indices):
            raise _mismatch(func, tensors)
        values = _tensors(list(args[2:]), [])
        if any(_tagged(v) != self_on_gpu and v.dim() > 0 for v in values):
            raise _mismatch(func, tensors)
        return self_on_gpu
    # CUDA takes 0-dim host tensors as scalars in elementwise ops only.
    scalars_ok = _pointwise(func)
    if any(not g and (t.dim() > 0 or not scalars_ok) for t, g in zip(tensors, tagged)):
        raise _mismatch(func, tensors)
    return True


@functools.lru_cache(maxsize=None)
def _pointwise(func) -> bool:
    return torch.Tag.pointwise in func.tags or func in _SCALAR_OK


# Not tagged pointwise, yet CUDA takes a host scalar tensor there too.
_SCALAR_OK = {
    _aten.where.self,
    _aten.masked_fill.Tensor,
    _aten.masked_fill_.Tensor,
    _aten.fill_.Tensor,
    _aten.fill.Tensor,
    _aten.clamp.Tensor,
    _aten.clamp_.Tensor,
    _aten.lerp.Tensor,
    _aten.lerp_.Tensor,
    _aten._foreach_mul_.Tensor,
    _aten._foreach_mul.Tensor,
    _aten._foreach_add_.Tensor,
    _aten._foreach_div_.Tensor,
}


def _counts_as_sync(func, args, kwargs) -> bool:
    if func in _DATA_DEPENDENT:
        return True
    if func in (
        _aten.index.Tensor,
        _aten.index_put_.default,
        _aten.index_put.default,
        _aten._index_put_impl_.default,
    ):  # a device mask becomes indices on the host first,
        masks = [i for i in args[1] if i is not None and i.dtype in (torch.bool, torch.uint8)]
        if func is not _aten.index.Tensor and _becomes_masked_fill(args):
            return False  # ... except `t[mask] = scalar`, which CUDA runs as masked_fill_
        return any(_tagged(m) for m in masks)
    if func is _aten.copy_.default:
        return not _tagged(args[0]) and not (len(args) > 2 and args[2])
    return False


def _becomes_masked_fill(args) -> bool:
    """index_put_(self, [mask], value) with one boolean mask, a one-element value and no accumulation."""
    indices = [i for i in args[1] if i is not None]
    accumulate = len(args) > 3 and args[3]
    return (
        len(indices) == 1
        and indices[0].dtype == torch.bool
        and args[2].numel() == 1
        and not accumulate
    )


@functools.lru_cache(maxsize=None)
def _keeps_input_tags(func) -> bool:
    """In-place and out= ops return their inputs, whose storages keep their tags."""
    return func._schema.is_mutable or func is _aten.lift_fresh.default


class StrictDeviceMode(TorchDispatchMode):
    """Tags outputs of ops on emulated GPU tensors; refuses host/device mixes; counts syncs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunction():
            return self._dispatch(func, args, kwargs or {})

    def _dispatch(self, func, args, kwargs):
        inputs_on_gpu = _check_mixing(func, args, kwargs)
        if inputs_on_gpu and _counts_as_sync(func, args, kwargs):
            count_sync()
        out = func(*args, **kwargs)
        if _keeps_input_tags(func) or getattr(_local, "host_outputs", False):
            return out  # in-place: the output is an input, its storage keeps its tag
        # A plain CPU device is the real device of every tensor here (autograd's backward of a
        # dtype cast names it, for instance), so it keeps the inputs' side; moves to the host
        # are made, and untagged, by `move` at the function level.
        target = is_gpu_device(kwargs.get("device")) or inputs_on_gpu
        if target:
            for tensor in _tensors(out, []):
                _tag(tensor.untyped_storage())
        return out


# ---- function-level moves and reads -------------------------------------------------------------------------


def _target_of_to(args, kwargs):
    """'gpu', 'host' or None for Tensor.to's overloads."""
    device = kwargs.get("device")
    if device is None and len(args) > 1:
        first = args[1]
        if isinstance(first, torch.Tensor):
            return "gpu" if on_gpu(first) else "host"
        if isinstance(first, (str, int, torch.device)) and not isinstance(first, bool):
            device = first
    if device is None:
        return None
    return "gpu" if is_gpu_device(device) else "host"


def move(func, args, kwargs, target: str | None, call):
    """Run a device-moving Tensor method: a real copy when the tensor changes sides, as on a GPU."""
    source = args[0]
    out = call(func, args, kwargs)
    if target is None or not isinstance(out, torch.Tensor):
        return out
    was_on_gpu = on_gpu(source)
    wants_gpu = target == "gpu"
    if was_on_gpu == wants_gpu:
        return out
    if out.untyped_storage()._cdata == source.untyped_storage()._cdata:
        with host_outputs():
            out = out.clone()
    if was_on_gpu and not kwargs.get("non_blocking", False):
        count_sync()
    return set_on_gpu(out, wants_gpu)


# Tensor methods that read device memory from the host, or refuse to (numpy).
_SYNCING_READS = frozenset(
    {torch.Tensor.tolist, torch.Tensor.__repr__, torch.Tensor.__str__, torch.Tensor.__format__}
)
_REFUSED_READS = frozenset({torch.Tensor.numpy, torch.Tensor.__array__})


def read(func, args, kwargs, call):
    """Count one sync for a host read of a GPU tensor; refuse numpy as CUDA does."""
    if not (args and isinstance(args[0], torch.Tensor) and on_gpu(args[0])):
        return call(func, args, kwargs)
    if func in _REFUSED_READS:
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
            "tensor to host memory first."
        )
    count_sync()
    with quiet_syncs():
        return call(func, args, kwargs)


def is_read(func) -> bool:
    return func in _SYNCING_READS or func in _REFUSED_READS


# ---- collectives ------------------------------------------------------------------------------------------

_host_groups: dict[int, object] = {}
_exempt = threading.local()
_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all_single",
    "all_to_all",
    "send",
    "recv",
    "isend",
    "irecv",
    "gather",
    "scatter",
)
# torch moves these objects' tensors to the group's device itself.
_OBJECT_COLLECTIVES = (
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
)


def is_host_group(group) -> bool:
    """Groups created with backend='gloo' stay gloo on a GPU machine; the others become NCCL."""
    return group is not None and id(group) in _host_groups


def _check_group(group, tensors) -> None:
    if getattr(_exempt, "active", False) or is_host_group(group):
        return
    with torch._C.DisableTorchFunction():
        if not all(_tagged(t) for t in tensors):
            raise RuntimeError(NCCL_HOST_TENSOR)


def _checked_collective(fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def collective(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        tensors = _tensors([v for k, v in bound.items() if k != "group"], [])
        _check_group(bound.get("group"), tensors)
        return fn(*args, **kwargs)

    return collective


def _checked_batch_p2p(fn):
    @functools.wraps(fn)
    def batch_isend_irecv(p2p_op_list):
        for op in p2p_op_list:
            _check_group(op.group, _tensors(op.tensor, []))
        return fn(p2p_op_list)

    return batch_isend_irecv


def _exempt_inside(fn):
    @functools.wraps(fn)
    def object_collective(*args, **kwargs):
        before = getattr(_exempt, "active", False)
        _exempt.active = True
        try:
            return fn(*args, **kwargs)
        finally:
            _exempt.active = before

    return object_collective


def _recording_new_group(fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def new_group(*args, **kwargs):
        group = fn(*args, **kwargs)
        backend = signature.bind_partial(*args, **kwargs).arguments.get("backend")
        if group is not None and isinstance(backend, str) and backend.lower() == "gloo":
            _host_groups[id(group)] = group
        return group

    return new_group


def patch_collectives() -> None:
    """Wrap torch.distributed's collectives (both namespaces megatron and torch itself call)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    wrappers = {name: _checked_collective for name in _COLLECTIVES}
    wrappers.update({name: _exempt_inside for name in _OBJECT_COLLECTIVES})
    wrappers["batch_isend_irecv"] = _checked_batch_p2p
    wrappers["new_group"] = _recording_new_group
    replaced = {}
    for name, wrap in wrappers.items():
        original = getattr(c10d, name)
        replaced[id(original)] = wrapped = wrap(original)
        setattr(c10d, name, wrapped)
        if getattr(dist, name, None) is original:
            setattr(dist, name, wrapped)
    # megatron binds some at import (`dist_reduce_scatter_func = torch.distributed.reduce_scatter_tensor`):
    # modules imported before this point get the wrapped function too.
    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("megatron"):
            continue
        for attribute, value in list(vars(module).items()):
            if callable(value) and id(value) in replaced:
                setattr(module, attribute, replaced[id(value)])

"""Strict device emulation: each bug class a GPU would stop is stopped here too, and only in strict mode.

Every planted bug runs twice, in fresh processes: with strict mode (the default)
it must fail with the error a GPU gives; with MEGAMFT_STRICT_DEVICE=0 (the old,
lenient emulation) it must pass unnoticed, which shows that the test can fail.
"""

import pytest
import torch

from megamft.emulation.strict_device import NCCL_HOST_TENSOR
from megamft.testing.distributed import DistributedTestError, launch

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the emulation is for machines without CUDA"
)

DEVICE_MISMATCH = "Expected all tensors to be on the same device"


def _outcome(fn, world_size: int, strict: bool, monkeypatch, **kwargs) -> str:
    """'ok', or the first line of the failing rank's error."""
    monkeypatch.setenv("MEGAMFT_STRICT_DEVICE", "1" if strict else "0")
    try:
        launch(fn, world_size, kwargs=kwargs, timeout=180)
        return "ok"
    except DistributedTestError as error:
        return str(error)


def _assert_caught_only_when_strict(fn, world_size, expected, monkeypatch, **kwargs):
    assert expected in _outcome(fn, world_size, True, monkeypatch, **kwargs)
    assert _outcome(fn, world_size, False, monkeypatch, **kwargs) == "ok"


# ---- planted bugs -------------------------------------------------------------------------------------------


def _host_tensor_into(group_name: str, tensor_parallel: int):
    from megatron.core import parallel_state

    torch.distributed.init_process_group("gloo")
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
        group = {
            "tp": parallel_state.get_tensor_model_parallel_group,
            "dp": parallel_state.get_data_parallel_group,
            "dp_gloo": parallel_state.get_data_parallel_group_gloo,
        }[group_name]()
        on_device = torch.ones(4, device="cuda")
        torch.distributed.all_reduce(on_device, group=group)  # always fine
        torch.distributed.all_reduce(torch.ones(4), group=group)  # the planted host tensor
    finally:  # a process group left open can abort the interpreter at exit
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("group_name, tensor_parallel", [("tp", 2), ("dp", 1)])
def test_a_host_tensor_in_an_nccl_collective_gives_nccls_error(
    group_name, tensor_parallel, monkeypatch
):
    _assert_caught_only_when_strict(
        _host_tensor_into,
        2,
        NCCL_HOST_TENSOR,
        monkeypatch,
        group_name=group_name,
        tensor_parallel=tensor_parallel,
    )


def _host_tensor_through_megatrons_reduce_scatter():
    """The sequence-parallel path: megatron bound torch's reduce_scatter_tensor at import time."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

    torch.distributed.init_process_group("gloo")
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        reduce_scatter_to_sequence_parallel_region(torch.ones(4, 2, device="cuda"))  # fine
        reduce_scatter_to_sequence_parallel_region(torch.ones(4, 2))  # the planted host tensor
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_collectives_megatron_bound_at_import_are_checked_too(monkeypatch):
    _assert_caught_only_when_strict(
        _host_tensor_through_megatrons_reduce_scatter, 2, NCCL_HOST_TENSOR, monkeypatch
    )


def test_megatrons_gloo_groups_keep_taking_host_tensors(monkeypatch):
    assert (
        _outcome(_host_tensor_into, 2, True, monkeypatch, group_name="dp_gloo", tensor_parallel=1)
        == "ok"
    )


def _mix_in_forward():
    torch.ones(3, device="cuda") * torch.ones(3)


def _mix_in_backward():
    class HostInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.arange(3.0)  # a host tensor built in backward

    x = torch.ones(3, device="cuda", requires_grad=True)
    HostInBackward.apply(x).sum().backward()


@pytest.mark.parametrize(
    "planted", [_mix_in_forward, _mix_in_backward], ids=["forward", "backward"]
)
def test_a_host_device_mix_gives_cudas_error(planted, monkeypatch):
    _assert_caught_only_when_strict(planted, 1, DEVICE_MISMATCH, monkeypatch)


def _parameter_left_on_the_host():
    class HostNorm(torch.nn.Module):  # megamft's RMSNorm as it was: its weight made on the host
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return torch.nn.functional.rms_norm(x, (8,)) * self.weight

    HostNorm()(torch.randn(2, 8, device="cuda"))


def test_a_parameter_left_on_the_host_gives_cudas_error(monkeypatch):
    _assert_caught_only_when_strict(_parameter_left_on_the_host, 1, DEVICE_MISMATCH, monkeypatch)


def _host_tensor_to_the_fused_loss():
    from megamft.loss.fused_ce import fused_multitask_cross_entropy

    tokens, vocab = 6, 11
    logits = torch.randn(tokens, vocab, device="cuda", requires_grad=True) * 1
    on_device = dict(
        labels=torch.randint(0, vocab, (tokens,), device="cuda"),
        token_weights=torch.ones(tokens, device="cuda"),
        loss_mask=torch.ones(tokens, device="cuda"),
        task_ids=torch.zeros(tokens, dtype=torch.long),  # the planted host tensor
        sample_index=torch.arange(tokens, device="cuda"),
    )
    fused_multitask_cross_entropy(logits, num_tasks=1, num_samples=tokens, **on_device)


def test_a_host_tensor_given_to_the_fused_loss_names_the_argument(monkeypatch):
    monkeypatch.setenv("MEGAMFT_STRICT_DEVICE", "1")
    with pytest.raises(DistributedTestError, match="task_ids"):
        launch(_host_tensor_to_the_fused_loss, 1, timeout=120)


# ---- what strict mode allows, counts and measures ----------------------------------------------------------


def _allowed_and_counted():
    from megamft.emulation import strict_device as sd

    x = torch.arange(6.0, device="cuda")
    assert sd.on_gpu(x) and not sd.on_gpu(torch.ones(2))
    assert (
        x.device.type == "cuda" and x.is_cuda
    )  # code that follows .device allocates on the device
    assert sd.on_gpu(torch.zeros(2, device=x.device)) and sd.on_gpu(x.new_zeros(2))
    assert sd.on_gpu(
        x * torch.tensor(2.0)
    )  # a 0-dim host scalar is fine in elementwise ops, as on CUDA
    assert sd.on_gpu(x[torch.tensor([0, 2])])  # so are host indices
    try:  # but not as the index of index_select
        x.index_select(0, torch.tensor(1))
        raise AssertionError("index_select with a host index passed")
    except RuntimeError as error:
        assert "same device" in str(error)
    assert x.type() == "torch.cuda.FloatTensor" and torch.ones(2).type() == "torch.FloatTensor"
    assert not x.is_cpu and torch.ones(2).is_cpu
    assert not sd.on_gpu(torch.as_tensor(x, device="cpu")) and sd.on_gpu(
        x
    )  # a copy; x stays on the GPU
    assert sd.on_gpu(torch.nn.Parameter(x)) and sd.on_gpu(x.view(2, 3).t())
    host = x.cpu()
    assert not sd.on_gpu(host) and sd.on_gpu(x) and host.data_ptr() != x.data_ptr()
    counted = {}
    for name, read in [
        ("item", lambda: x.sum().item()),
        ("bool", lambda: bool(x[1] > 0)),
        ("tolist", lambda: x.tolist()),
        ("cpu", lambda: x.cpu()),
        ("print", lambda: repr(x)),
        ("nonzero", lambda: x.nonzero()),
        ("host math", lambda: host.sum().item()),
        ("mask select", lambda: x[x > 2]),
        ("mask fill", lambda: x.__setitem__(x > 4, 0.0)),
        ("device math", lambda: (x * 2).sum()),
    ]:
        before = sd.sync_count()
        read()
        counted[name] = sd.sync_count() - before
    return counted


def test_device_to_host_reads_are_counted_once_each(monkeypatch):
    monkeypatch.setenv("MEGAMFT_STRICT_DEVICE", "1")
    (counted,) = launch(_allowed_and_counted, 1, timeout=120)
    assert counted == {
        "item": 1,
        "bool": 1,
        "tolist": 1,
        "cpu": 1,
        "print": 1,
        "nonzero": 1,
        "host math": 0,
        "mask select": 1,
        "mask fill": 0,
        "device math": 0,
    }


def _device_memory():
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    x = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    y = x.float()  # 4 MiB more
    held = torch.cuda.memory_allocated() - base
    del x, y
    host = torch.empty(1 << 22)  # host memory is not device memory
    return (
        held,
        torch.cuda.max_memory_allocated() - base,
        torch.cuda.memory_allocated() - base,
        host.numel(),
    )


def test_emulated_device_memory_is_measured(monkeypatch):
    monkeypatch.setenv("MEGAMFT_STRICT_DEVICE", "1")
    (result,) = launch(_device_memory, 1, timeout=120)
    held, peak, after, _ = result
    assert held == peak == 5 << 20 and after == 0


def test_bf16_logits_reach_the_fused_loss_without_an_fp32_copy(monkeypatch):
    """Peak emulated device memory of a bf16 step with the fused loss, against the old fp32 upcast.

    The upcast replaces the bf16 logits (2 bytes a logit) by an fp32 copy (4 bytes): at least
    2 x tokens x vocab bytes more at the step's peak. With the fix the loss reads the bf16 logits.
    """
    import jobs

    monkeypatch.setenv("MEGAMFT_STRICT_DEVICE", "1")
    kwargs = dict(fused=True, vocab=16384, tokens_per_micro_batch=512)
    (fixed,) = launch(
        jobs.loss_step_memory, 1, kwargs={**kwargs, "upcast_logits": False}, timeout=240
    )
    (planted,) = launch(
        jobs.loss_step_memory, 1, kwargs={**kwargs, "upcast_logits": True}, timeout=240
    )
    upcast_extra = 2 * 512 * fixed["padded_vocab"]
    assert planted["added"] - fixed["added"] >= 0.95 * upcast_extra, (fixed, planted)
    assert abs(fixed["loss"] - planted["loss"]) <= 1e-2 * abs(planted["loss"])


@pytest.mark.parametrize(
    "overrides",
    [
        ("loss.mode=token",),
        ("loss.mode=sample",),
        ("loss.mode=task_token",),
        ("loss.mode=task_sample",),
        ("loss.mode=task_token", "loss.fused_cross_entropy=true"),
    ],
    ids=["token", "sample", "task_token", "task_sample", "fused"],
)
def test_a_training_step_synchronizes_only_where_listed(overrides, monkeypatch):
    """Counted per step: megatron's `num_tokens > 0` in finalize_model_grads, megatron's gradient-norm
    `.item()` for clipping, and megamft's one read of the step's statistics (loss, per-task sums)
    that the non-finite check and the log need. The loss weighting itself adds none, and neither do
    packed rows (data.mode=pack, the default) through the torch attention backend: their boundaries
    reach the device as cu_seqlens computed on the host."""
    import jobs

    monkeypatch.setenv("MEGAMFT_STRICT_DEVICE", "1")
    (syncs,) = launch(jobs.device_syncs_per_step, 1, kwargs={"overrides": overrides}, timeout=240)
    assert len(syncs) == 3 and max(syncs) <= 3, syncs

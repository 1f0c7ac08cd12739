"""The CPU emulation redirects megatron-core's CUDA assumptions, and only without CUDA."""

import subprocess
import sys
import textwrap

import pytest
import torch

from megamft.emulation import cpu_emulation

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="emulation is for machines without CUDA"
)


def _run_isolated(code: str) -> str:
    # The emulation patches process-wide state, so each check runs in a fresh interpreter.
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cuda_requests_land_on_the_cpu():
    out = _run_isolated("""
        import torch
        from megamft.emulation import cpu_emulation
        assert cpu_emulation.enable_if_no_cuda()
        a = torch.zeros(3, device="cuda")
        b = torch.ones(2, device=torch.cuda.current_device())
        c = torch.empty(2, device=torch.device("cuda", 0), pin_memory=True)
        assert a.new_empty(3, 4).shape == (3, 4)
        d = a.cuda()
        e = a.to("cuda:0")
        host = a.cpu()
        # CPU memory underneath; strict mode reports the device each tensor stands for.
        assert all(t.untyped_storage().device.type == "cpu" for t in (a, b, c, e, host))
        print(a.device, b.device, c.device, d is a, e is a, host.device, a.new_empty(2).device)
        print(a.type(), a.type(torch.float64).dtype, a.type("torch.cuda.HalfTensor").dtype)
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            torch.cuda.current_stream().wait_stream(s)
        ev = torch.cuda.Event(enable_timing=True); ev.record()
    """).splitlines()
    devices, types = out[0].split(), out[1].split()
    assert devices == ["cuda:0", "cuda:0", "cuda:0", "True", "True", "cpu", "cuda:0"]
    assert types == ["torch.cuda.FloatTensor", "torch.float64", "torch.float16"]


def test_megatron_rng_tracker_is_backed_by_the_cpu_generator():
    out = _run_isolated("""
        import torch
        from megamft.emulation import cpu_emulation
        cpu_emulation.enable()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, initialize_rng_tracker
        initialize_rng_tracker()
        tracker = get_cuda_rng_tracker()
        tracker.add("a", 123)
        torch.manual_seed(0)
        outside = torch.get_rng_state()
        with tracker.fork("a"):
            first = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), outside), "fork must restore the outer state"
        with tracker.fork("a"):
            second = torch.rand(4)
        torch.manual_seed(123)
        expected = torch.rand(8)
        print(torch.equal(torch.cat([first, second]), expected))
    """)
    assert out.strip() == "True"  # the tracked stream continues across forks, seeded as asked


def test_refuses_to_run_where_cuda_exists(monkeypatch):
    monkeypatch.setattr(cpu_emulation, "_enabled", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must not run on a machine with CUDA"):
        cpu_emulation.enable()
    assert not cpu_emulation.enable_if_no_cuda() and not cpu_emulation.is_enabled()

"""Fused cross entropy: the torch path and TP shard logic against plain torch; kernels on GPU."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megamft.loss.fused_ce import fused_multitask_cross_entropy

ROOT = Path(__file__).resolve().parents[1]


def _case(tokens=40, vocab=300, tasks=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    mask = (torch.rand(tokens, generator=g) > 0.3).float()
    mask[:3] = 0                                     # ignored tokens
    task_ids = torch.randint(0, tasks - 1, (tokens,), generator=g)  # the last task stays empty
    sample_index = torch.arange(tokens) // 3
    sample_index[-1] = sample_index[-2] + 1          # a one-token sample
    weights = mask * torch.rand(tokens, generator=g)
    return logits, labels, weights, mask, task_ids, sample_index, tasks, int(sample_index.max()) + 1


def _reference(logits, labels, weights, mask, task_ids, sample_index, tasks, samples):
    x = logits.float().detach().requires_grad_()
    per_token = F.cross_entropy(x, labels, reduction="none")
    total = (per_token * weights).sum()
    total.backward()
    task_sums = torch.zeros(tasks, dtype=torch.float64).index_add_(0, task_ids, (per_token * mask).double())
    sample_sums = torch.zeros(samples, dtype=torch.float64).index_add_(0, sample_index, (per_token * mask).double())
    return total.detach(), per_token.detach(), task_sums.detach(), sample_sums.detach(), x.grad


def test_torch_path_matches_plain_cross_entropy_with_inplace_gradient():
    case = _case()
    want_total, want_tok, want_tasks, want_samples, want_grad = _reference(*case)
    logits = case[0].clone().requires_grad_()
    work = logits * 1.0  # a tensor the loss owns, as the LM head's output is
    out = fused_multitask_cross_entropy(work, *case[1:])
    torch.testing.assert_close(out.total, want_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.per_token_loss, want_tok, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.task_sums, want_tasks, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sample_sums, want_samples, rtol=1e-5, atol=1e-6)
    assert out.task_sums[-1] == 0 and out.sample_sums[0] == 0  # empty task; fully ignored sample
    out.total.backward()
    torch.testing.assert_close(logits.grad, want_grad, rtol=1e-5, atol=1e-6)
    assert logits.grad[:3].abs().sum() == 0  # ignored tokens get no gradient


def _tp2_rank(case_seed: int):
    """One TP rank: its vocab shard through the fused loss, all-reduces over gloo."""
    torch.distributed.init_process_group("gloo")
    try:
        rank = torch.distributed.get_rank()
        logits, labels, weights, mask, task_ids, sample_index, tasks, samples = _case(vocab=301, seed=case_seed)
        bounds = [(0, 150), (150, 301)][rank]
        shard = logits[:, bounds[0]:bounds[1]].clone().requires_grad_()
        out = fused_multitask_cross_entropy(shard * 1, labels, weights, mask, task_ids, sample_index, tasks,
                                            samples, vocab_start=bounds[0], tp_group=torch.distributed.group.WORLD)
        out.total.backward()
        return {"per_token": out.per_token_loss, "total": out.total.detach(), "task_sums": out.task_sums,
                "grad": shard.grad, "bounds": bounds}
    finally:
        torch.distributed.destroy_process_group()


def test_tp2_vocab_shards_give_the_full_result():
    from megamft.testing.distributed import launch

    case = _case(vocab=301, seed=5)
    want_total, want_tok, want_tasks, _, want_grad = _reference(*case)
    for result in launch(_tp2_rank, 2, kwargs={"case_seed": 5}, timeout=120):
        torch.testing.assert_close(result["per_token"], want_tok, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["total"], want_total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["task_sums"], want_tasks, rtol=1e-5, atol=1e-6)
        a, b = result["bounds"]
        torch.testing.assert_close(result["grad"], want_grad[:, a:b], rtol=1e-5, atol=1e-6)


def test_bf16_logits_are_read_without_an_fp32_copy_of_the_whole():
    case = _case(dtype=torch.bfloat16)
    want_total, want_tok, *_ = _reference(*case)
    out = fused_multitask_cross_entropy(case[0].clone().requires_grad_() * 1, *case[1:])
    torch.testing.assert_close(out.per_token_loss, want_tok, rtol=1e-4, atol=1e-4)


def test_kernel_sources_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("nvcc not installed")
    proc = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-c", str(ROOT / "csrc" / "fused_ce.cu"),
                           "-o", str(tmp_path / "fused_ce.o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fused_ce.o").stat().st_size > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [32000, 152064])
def test_kernels_match_the_torch_reference_on_gpu(dtype, vocab):
    case = _case(tokens=8192, vocab=vocab, tasks=8, dtype=dtype)
    cuda_case = [c.cuda() if isinstance(c, torch.Tensor) else c for c in case]
    want_total, want_tok, want_tasks, want_samples, want_grad = _reference(*[c.cpu() if isinstance(c, torch.Tensor) else c for c in cuda_case])
    logits = cuda_case[0].clone().requires_grad_()
    out = fused_multitask_cross_entropy(logits * 1, *cuda_case[1:])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.per_token_loss.cpu(), want_tok, **tol)
    torch.testing.assert_close(out.task_sums.cpu(), want_tasks, rtol=1e-3, atol=1e-2)
    out.total.backward()
    torch.testing.assert_close(logits.grad.float().cpu(), want_grad, **tol)

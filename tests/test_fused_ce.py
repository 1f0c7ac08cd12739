"""Fused cross entropy: the torch path and TP shard logic against plain torch; kernels on GPU."""

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megamft.loss import fused_ce
from megamft.loss.fused_ce import RowStats, combine, fused_multitask_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _case(tokens=40, vocab=300, tasks=4, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    mask = (torch.rand(tokens, generator=g, device=device) > 0.3).float()
    mask[:3] = 0  # ignored tokens
    task_ids = torch.randint(
        0, tasks - 1, (tokens,), generator=g, device=device
    )  # the last task stays empty
    sample_index = torch.arange(tokens, device=device) // 3
    sample_index[-1] = sample_index[-2] + 1  # a one-token sample
    weights = mask * torch.rand(tokens, generator=g, device=device)
    return logits, labels, weights, mask, task_ids, sample_index, tasks, int(sample_index.max()) + 1


def _reference(logits, labels, weights, mask, task_ids, sample_index, tasks, samples):
    """Plain torch on the inputs' device: (total, per-token, task sums, sample sums, gradient)."""
    x = logits.float().detach().requires_grad_()
    per_token = F.cross_entropy(x, labels, reduction="none")
    total = (per_token * weights).sum()
    total.backward()
    masked = (per_token * mask).double().detach()
    device = logits.device
    task_sums = torch.zeros(tasks, dtype=torch.float64, device=device).index_add_(
        0, task_ids, masked
    )
    sample_sums = torch.zeros(samples, dtype=torch.float64, device=device).index_add_(
        0, sample_index, masked
    )
    return total.detach(), per_token.detach(), task_sums, sample_sums, x.grad


def _run(case, **kwargs):
    """The fused loss on a copy of the case's logits: (output, gradient over the logits)."""
    logits = case[0].clone().requires_grad_()
    out = fused_multitask_cross_entropy(logits * 1, *case[1:], **kwargs)
    out.total.backward()
    return out, logits.grad


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
        # on the (emulated) GPU, as on a GPU machine: NCCL groups refuse host tensors
        logits, labels, weights, mask, task_ids, sample_index, tasks, samples = _cuda(
            _case(vocab=301, seed=case_seed)
        )
        bounds = [(0, 150), (150, 301)][rank]
        shard = logits[:, bounds[0] : bounds[1]].clone().requires_grad_()
        out = fused_multitask_cross_entropy(
            shard * 1,
            labels,
            weights,
            mask,
            task_ids,
            sample_index,
            tasks,
            samples,
            vocab_start=bounds[0],
            tp_group=torch.distributed.group.WORLD,
        )
        out.total.backward()
        return {
            "per_token": out.per_token_loss.cpu(),
            "total": out.total.detach().cpu(),
            "task_sums": out.task_sums.cpu(),
            "grad": shard.grad.cpu(),
            "bounds": bounds,
        }
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


def _gathered_logps(logits, labels, mask, sample_index, samples):
    """Independent reference: each sample's summed log-probability, a log_softmax gather, differentiable."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    return torch.zeros(samples).index_add(0, sample_index, logp * mask)


def _sample_objective_case(seed=0, vocab=300):
    """A case with every sample's coefficient c_s: the objective total + sum_s c_s x sample_sums_s."""
    case = _case(vocab=vocab, seed=seed)
    coefficients = torch.randn(case[-1], generator=torch.Generator().manual_seed(seed + 1))
    return case, coefficients


def _sample_objective_reference(case, coefficients):
    """(minus each sample's log-probability, the objective's gradient over the full logits), plain torch."""
    logits, labels, weights, mask, task_ids, sample_index, tasks, samples = case
    x = logits.float().detach().requires_grad_()
    sums = -_gathered_logps(x, labels, mask, sample_index, samples)
    per_token = -torch.log_softmax(x, dim=-1).gather(1, labels[:, None]).squeeze(1)
    ((per_token * weights).sum() + (sums * coefficients).sum()).backward()
    return sums.detach(), x.grad


def test_per_sample_sums_carry_gradients_equal_to_a_log_softmax_gather():
    """d/dlogits of total + sum_s c_s sample_sums_s: weight and sample terms in one in-place backward."""
    case, coefficients = _sample_objective_case()
    want_sums, want_grad = _sample_objective_reference(case, coefficients)
    logits = case[0].clone().requires_grad_()
    out = fused_multitask_cross_entropy(logits * 1, *case[1:])
    torch.testing.assert_close(out.sample_sums.float(), want_sums, rtol=1e-5, atol=1e-5)
    (out.total + (out.sample_sums * coefficients.double()).sum()).backward()
    torch.testing.assert_close(logits.grad, want_grad, rtol=1e-5, atol=1e-6)
    assert logits.grad[:3].abs().sum() == 0  # mask 0: no gradient from either term


def _tp2_sample_sums_rank(case_seed: int):
    """One TP rank (uniform vocab shards, as training cuts them): total + sum_s c_s sample_sums_s."""
    torch.distributed.init_process_group("gloo")
    try:
        rank = torch.distributed.get_rank()
        case, coefficients = _sample_objective_case(seed=case_seed, vocab=300)
        logits, *rest = _cuda(case)
        shard = logits[:, rank * 150 : (rank + 1) * 150].clone().requires_grad_()
        out = fused_multitask_cross_entropy(
            shard * 1, *rest, vocab_start=rank * 150, tp_group=torch.distributed.group.WORLD
        )
        (out.total + (out.sample_sums * coefficients.double().to(shard.device)).sum()).backward()
        return {"sample_sums": out.sample_sums.cpu(), "grad": shard.grad.cpu(), "rank": rank}
    finally:
        torch.distributed.destroy_process_group()


def test_tp2_per_sample_sums_and_their_gradients_equal_a_log_softmax_gather():
    from megamft.testing.distributed import launch

    case, coefficients = _sample_objective_case(seed=7)
    want_sums, want_grad = _sample_objective_reference(case, coefficients)
    for result in launch(_tp2_sample_sums_rank, 2, kwargs={"case_seed": 7}, timeout=120):
        torch.testing.assert_close(result["sample_sums"].float(), want_sums, rtol=1e-5, atol=1e-5)
        a = result["rank"] * 150
        torch.testing.assert_close(result["grad"], want_grad[:, a : a + 150], rtol=1e-5, atol=1e-6)


def test_bf16_logits_are_read_without_an_fp32_copy_of_the_whole():
    case = _case(dtype=torch.bfloat16)
    want_total, want_tok, *_ = _reference(*case)
    out = fused_multitask_cross_entropy(case[0].clone().requires_grad_() * 1, *case[1:])
    torch.testing.assert_close(out.per_token_loss, want_tok, rtol=1e-4, atol=1e-4)


# --- argument checks (CPU) -------------------------------------------------------------------------


def _replace(case, index, value):
    case = list(case)
    case[index] = value
    return case


def _non_contiguous(t):
    return torch.stack([t, t], dim=1)[:, 0]


_META = torch.device("meta")
_BAD_ARGUMENTS = {
    # name: (argument index, how to break it, the start of the message)
    "labels on another device": (1, lambda t: t.to(_META), "labels must be on the logits' device"),
    "token_weights on another device": (2, lambda t: t.to(_META), "token_weights must be on"),
    "loss_mask on another device": (3, lambda t: t.to(_META), "loss_mask must be on"),
    "task_ids on another device": (4, lambda t: t.to(_META), "task_ids must be on"),
    "sample_index on another device": (5, lambda t: t.to(_META), "sample_index must be on"),
    "float64 logits": (0, lambda t: t.double(), "logits must be float32, bfloat16 or float16"),
    "integer logits": (0, lambda t: t.long(), "logits must be float32"),
    "1-D logits": (0, lambda t: t[:, 0], "logits must be [tokens, vocab shard]"),
    "column-major logits": (
        0,
        lambda t: t.t().contiguous().t(),
        "logits must have contiguous, non-overlapping rows",
    ),
    "overlapping logits rows": (
        0,
        lambda t: t[:1].expand(t.shape[0], -1),
        "logits must have contiguous",
    ),
    "float labels": (1, lambda t: t.float(), "labels must have an integer dtype"),
    "bool task_ids": (4, lambda t: t > 0, "task_ids must have an integer dtype"),
    "float sample_index": (5, lambda t: t.float(), "sample_index must have an integer dtype"),
    "integer token_weights": (2, lambda t: t.long(), "token_weights must have a floating dtype"),
    "bool loss_mask": (3, lambda t: t > 0, "loss_mask must have a floating dtype"),
    "short labels": (1, lambda t: t[:-1], "labels must be 1-D with one entry per token"),
    "2-D token_weights": (2, lambda t: t[:, None], "token_weights must be 1-D"),
    "long loss_mask": (3, lambda t: torch.cat([t, t]), "loss_mask must be 1-D"),
    "short task_ids": (4, lambda t: t[1:], "task_ids must be 1-D"),
    "short sample_index": (5, lambda t: t[:5], "sample_index must be 1-D"),
    "non-contiguous labels": (1, _non_contiguous, "labels must be contiguous"),
    "non-contiguous token_weights": (2, _non_contiguous, "token_weights must be contiguous"),
    "non-contiguous loss_mask": (3, _non_contiguous, "loss_mask must be contiguous"),
    "non-contiguous task_ids": (4, _non_contiguous, "task_ids must be contiguous"),
    "non-contiguous sample_index": (5, _non_contiguous, "sample_index must be contiguous"),
    "negative num_tasks": (6, lambda n: -1, "num_tasks must be a non-negative int"),
    "float num_samples": (7, lambda n: float(n), "num_samples must be a non-negative int"),
    "tensor labels as a list": (1, lambda t: t.tolist(), "labels must be a tensor"),
}


@pytest.mark.parametrize("what", sorted(_BAD_ARGUMENTS))
def test_bad_arguments_raise_value_error_naming_them(what):
    index, breaker, message = _BAD_ARGUMENTS[what]
    case = _case()
    case = _replace(case, index, breaker(case[index]))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        fused_multitask_cross_entropy(*case)


def test_negative_vocab_start_is_refused():
    with pytest.raises(ValueError, match="vocab_start must be a non-negative int"):
        fused_multitask_cross_entropy(*_case(), vocab_start=-1)


@pytest.mark.parametrize(
    "name,index,value,message",
    [
        ("task_ids", 4, 4, r"task_ids must lie in \[0, num_tasks=4\), got values in \[0, 4\]"),
        ("task_ids", 4, -2, r"task_ids must lie in \[0, num_tasks=4\), got values in \[-2, 2\]"),
        (
            "sample_index",
            5,
            99,
            r"sample_index must lie in \[0, num_samples=14\), got values in \[0, 99\]",
        ),
        (
            "sample_index",
            5,
            -1,
            r"sample_index must lie in \[0, num_samples=14\), got values in \[-1, 13\]",
        ),
    ],
)
def test_out_of_range_ids_raise_with_check_ids(name, index, value, message):
    case = _case()
    ids = case[index].clone()
    ids[7] = value
    case = _replace(case, index, ids)
    with pytest.raises(ValueError, match=message):
        fused_multitask_cross_entropy(*case)


def test_unchecked_out_of_range_ids_count_in_no_sum():
    case = _case()
    task_ids, sample_index = case[4].clone(), case[5].clone()
    bad = case[3].nonzero().squeeze(1)[:3]  # learned tokens, so they would count somewhere
    task_ids[bad] = torch.tensor([4, -1, 1000])
    sample_index[bad] = torch.tensor([-5, 15, 1 << 40])
    out, _ = _run(_replace(_replace(case, 4, task_ids), 5, sample_index), check_ids=False)
    _, per_token, *_ = _reference(*case)
    keep = torch.ones(len(per_token), dtype=torch.bool)
    keep[bad] = False
    masked = (per_token * case[3] * keep).double()
    want_tasks = torch.zeros(4, dtype=torch.float64).index_add_(0, case[4], masked)
    want_samples = torch.zeros(case[7], dtype=torch.float64).index_add_(0, case[5], masked)
    torch.testing.assert_close(out.task_sums, want_tasks, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sample_sums, want_samples, rtol=1e-5, atol=1e-6)


def test_fp16_logits_match_the_reference():
    case = _case(dtype=torch.float16)
    want_total, want_tok, *_ = _reference(*case)
    out, _ = _run(case)
    torch.testing.assert_close(out.per_token_loss, want_tok, rtol=1e-3, atol=1e-3)


# --- determinism and -inf (CPU, torch path) --------------------------------------------------------


def _outputs(out, grad):
    return [out.total, out.per_token_loss, out.task_sums, out.sample_sums, grad]


def _assert_bitwise_equal(first, second):
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def test_torch_path_is_bitwise_deterministic():
    case = _case(tokens=64, vocab=9000, tasks=5, seed=3)  # two vocab chunks
    first = _outputs(*_run(case))
    second = _outputs(*_run(case))
    _assert_bitwise_equal(first, second)


def _case_with_neg_inf_rows(tokens=12, vocab=9000, dtype=torch.float32):
    """Rows starting with -inf: row 3 over more than a whole vocab chunk, row 4 over a few columns
    (both finite later, both learned); row 5 likewise but masked out; row 6 all -inf and masked out."""
    case = list(_case(tokens=tokens, vocab=vocab, tasks=3, seed=11, dtype=dtype))
    logits, labels, weights, mask = case[0], case[1], case[2], case[3]
    logits[3, :8500] = float("-inf")
    logits[4, :7] = float("-inf")
    logits[5, :8500] = float("-inf")
    logits[6, :] = float("-inf")
    labels[3], labels[4], labels[5] = 8700, 100, 8600
    mask[3], mask[4], mask[5], mask[6] = 1.0, 1.0, 0.0, 0.0
    weights[3], weights[4], weights[5], weights[6] = 0.5, 0.25, 0.0, 0.0
    return case


def test_rows_starting_with_neg_inf_give_no_nan_on_the_torch_path():
    case = _case_with_neg_inf_rows()
    first = _outputs(*_run(case))
    out_total, per_token, task_sums, sample_sums, grad = first
    for t in (out_total, task_sums, sample_sums, grad):
        assert torch.isfinite(t).all()
    assert torch.isfinite(per_token[:6]).all() and per_token[6] == float("inf")
    assert torch.equal(grad[6], torch.zeros_like(grad[6])) and torch.equal(
        grad[5], torch.zeros_like(grad[5])
    )
    # against plain torch over the rows it can handle (every row but the all -inf one)
    keep = torch.ones(len(per_token), dtype=torch.bool)
    keep[6] = False
    sub = [c[keep] if isinstance(c, torch.Tensor) else c for c in case]
    want_total, want_tok, want_tasks, want_samples, want_grad = _reference(*sub)
    torch.testing.assert_close(per_token[keep], want_tok, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_total, want_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(task_sums, want_tasks, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sample_sums, want_samples, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[keep], want_grad, rtol=1e-5, atol=1e-6)
    _assert_bitwise_equal(first, _outputs(*_run(case)))


def test_combine_of_an_all_neg_inf_shard_row_is_not_nan():
    minus_inf = float("-inf")
    shard_a = RowStats(
        torch.tensor([minus_inf, 1.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.5])
    )
    shard_b = RowStats(
        torch.tensor([minus_inf, minus_inf]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])
    )
    merged = _combine_shards([shard_a, shard_b])
    assert merged.row_max[0] == minus_inf and merged.row_sumexp[0] == 0
    torch.testing.assert_close(merged.row_sumexp[1], torch.tensor(2.0))


# --- the just-in-time build's fallback (CPU) -------------------------------------------------------


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """kernels() as on a CUDA machine that has not tried the build yet (builds for H100 under tmp_path)."""
    monkeypatch.setattr(fused_ce, "_kernels", None)
    monkeypatch.setattr(fused_ce, "_build_failed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("MEGAMFT_KERNELS_DIR", str(tmp_path / "kernels"))
    return monkeypatch


def _fake_nvcc(tmp_path, release):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return str(home)


def _kernels_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fused_ce.kernels() is None
    return [str(w.message) for w in caught if "fused cross entropy" in str(w.message)]


@pytest.mark.parametrize(
    "problem", ["no toolkit", "no ninja", "other major", "build error", "no architecture"]
)
def test_kernels_fall_back_to_torch_with_one_clear_warning(fresh_kernels, tmp_path, problem):
    from torch.utils import cpp_extension

    if problem == "no architecture":  # no GPU visible (an image build) and no TORCH_CUDA_ARCH_LIST
        fresh_kernels.delenv("TORCH_CUDA_ARCH_LIST")
    fresh_kernels.setattr(cpp_extension, "is_ninja_available", lambda: problem != "no ninja")
    home = (
        None
        if problem == "no toolkit"
        else _fake_nvcc(tmp_path, "12.4" if problem == "other major" else "13.0")
    )
    fresh_kernels.setattr(cpp_extension, "CUDA_HOME", home)
    if problem == "build error":

        def broken_build(**kwargs):
            raise RuntimeError(
                "Error building extension 'megamft_fused_ce': [1/3] nvcc ... -c fused_ce.cu\n"
                'FAILED: fused_ce.cuda.o\nfused_ce.cu(10): error: identifier "oops" is undefined\n'
            )

        fresh_kernels.setattr(cpp_extension, "load", broken_build)
    expected = {
        "no toolkit": "no CUDA toolkit found (nvcc / CUDA_HOME",
        "no ninja": "pip install ninja",
        "other major": "is 12.4 but torch was built with CUDA 13.0",
        "build error": 'error: identifier "oops" is undefined',
        "no architecture": "no GPU is visible to pick the CUDA architectures from: set TORCH_CUDA_ARCH_LIST",
    }[problem]
    first = _kernels_warning()
    assert len(first) == 1 and expected in first[0] and "using the torch path" in first[0], first
    assert _kernels_warning() == []  # once per process
    assert not list((tmp_path / "kernels").glob("*/megamft-build.json"))  # nothing looks built


def test_without_a_toolkit_the_warning_names_kernels_prebuilt_for_other_settings(fresh_kernels):
    from torch.utils import cpp_extension

    from megamft.loss import fused_ce_build, kernel_cache

    fresh_kernels.setattr(cpp_extension, "CUDA_HOME", None)
    fresh_kernels.setenv("TORCH_CUDA_ARCH_LIST", "8.0")  # an image prebuilt for A100s
    image = fused_ce_build.kernel_folder()
    image.mkdir(parents=True)
    (image / kernel_cache.RECORD).write_text(
        json.dumps(
            {
                "key": "k",
                "library": "lib.so",
                "sha256": "0",
                "settings": fused_ce_build.build_settings(),
            }
        )
    )
    fresh_kernels.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # run on H100s
    [warning] = _kernels_warning()
    assert (
        "no CUDA toolkit found" in warning
        and f"holds builds for other settings: {image.name}: arch" in warning
    )
    assert "code=sm_80" in warning and "(here ['-gencode=arch=compute_90,code=sm_90'])" in warning


def test_a_kernels_root_that_cannot_be_written_is_named(fresh_kernels, tmp_path):
    from torch.utils import cpp_extension

    fresh_kernels.setattr(cpp_extension, "CUDA_HOME", _fake_nvcc(tmp_path, "13.0"))
    fresh_kernels.setattr(cpp_extension, "is_ninja_available", lambda: True)
    (tmp_path / "a-file").write_text("")
    fresh_kernels.setenv("MEGAMFT_KERNELS_DIR", str(tmp_path / "a-file" / "kernels"))
    [warning] = _kernels_warning()
    assert (
        f"no build of the kernels for these settings in {tmp_path / 'a-file' / 'kernels'}"
        in warning
    )
    assert (
        "cannot be built there (Not a directory): set MEGAMFT_KERNELS_DIR to a writable folder"
        in warning
    )


def test_kernel_sources_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc") or (
        "/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None
    )
    if nvcc is None:
        pytest.skip("nvcc not installed")
    proc = subprocess.run(
        [
            nvcc,
            "-std=c++17",
            "-O3",
            "-arch=sm_90",
            "-c",
            str(ROOT / "csrc" / "fused_ce.cu"),
            "-o",
            str(tmp_path / "fused_ce.o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fused_ce.o").stat().st_size > 0


# --- GPU ------------------------------------------------------------------------------------------


def _cuda(case):
    return [c.cuda() if isinstance(c, torch.Tensor) else c for c in case]


def _kernels_or_fail():
    impl = fused_ce.kernels()
    assert impl is not None, "the CUDA extension did not build (see the warning)"
    return impl


@needs_gpu
def test_build_kernels_prebuilds_what_a_process_without_a_toolkit_loads():
    """`megamft build-kernels` into the default kernels root (the build the GPU tests below then load)."""
    from megamft.loss import fused_ce_build, kernel_cache

    root = kernel_cache.default_root()
    proc = subprocess.run(
        [sys.executable, "-m", "megamft", "build-kernels", "--build-dir", str(root)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    folder = fused_ce_build.kernel_folder(root)
    assert f"ready in {folder} (" in proc.stdout and kernel_cache.read_record(folder) is not None
    # Another process loads it with no CUDA toolkit in sight, and builds nothing.
    load = (
        "import sys; from megamft.loss.fused_ce_build import load_extension\n"
        "m = load_extension(root=sys.argv[1]); print(m.__file__, m.shard_stats, m.finalize, m.backward_inplace)"
    )
    env = {**os.environ, "CUDA_HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}
    loaded = subprocess.run(
        [sys.executable, "-c", load, str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith(str(folder))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [32000, 152064])
def test_kernels_match_the_torch_reference_on_gpu(dtype, vocab):
    _kernels_or_fail()
    cuda_case = _case(tokens=8192, vocab=vocab, tasks=8, dtype=dtype, device="cuda")
    want_total, want_tok, want_tasks, want_samples, want_grad = _reference(*cuda_case)
    out, grad = _run(cuda_case)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.per_token_loss, want_tok, **tol)
    torch.testing.assert_close(out.task_sums, want_tasks, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(out.sample_sums, want_samples, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(out.total, want_total, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad.float(), want_grad, **tol)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sample_sum_gradients_of_the_kernels_match_the_torch_path_on_gpu(dtype):
    """The preference objectives' gradient (through sample_sums, and the weighted total) on the CUDA
    kernels against the torch path on the same GPU tensors."""
    _kernels_or_fail()
    case = _case(tokens=4096, vocab=32000, tasks=4, dtype=dtype, device="cuda")
    coefficients = torch.randn(case[-1], device="cuda", dtype=torch.float64)
    results = []
    for kernels_on in (True, False):
        logits = case[0].clone().requires_grad_()
        saved = fused_ce._kernels, fused_ce._build_failed
        if not kernels_on:
            fused_ce.adopt_kernels(None)  # the torch path on the same device
        try:
            out = fused_multitask_cross_entropy(logits * 1, *case[1:])
            (out.total + (out.sample_sums * coefficients).sum()).backward()
        finally:
            fused_ce._kernels, fused_ce._build_failed = saved
        results.append((out.sample_sums, logits.grad.float()))
    (kernel_sums, kernel_grad), (torch_sums, torch_grad) = results
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kernel_sums, torch_sums, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(kernel_grad, torch_grad, **tol)
    assert kernel_grad.abs().sum() > 0


@needs_gpu
def test_fp16_kernels_match_the_torch_reference_on_gpu():
    _kernels_or_fail()
    case = _case(tokens=4096, vocab=32000, tasks=8, dtype=torch.float16, device="cuda")
    want_total, want_tok, want_tasks, want_samples, want_grad = _reference(*case)
    out, grad = _run(case)
    torch.testing.assert_close(out.per_token_loss, want_tok, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.task_sums, want_tasks, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(grad.float(), want_grad, rtol=1e-2, atol=1e-4)


@needs_gpu
def test_kernels_handle_more_than_2_pow_31_logits_on_gpu():
    _kernels_or_fail()
    tokens, vocab = 16384, 152064  # 2.49e9 bf16 logits, 5 GB
    assert tokens * vocab > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=torch.bfloat16, device="cuda").normal_(
        0, 2, generator=g
    )
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    mask = torch.ones(tokens, device="cuda")
    weights = mask / tokens
    task_ids = torch.arange(tokens, device="cuda") % 3
    sample_index = torch.arange(tokens, device="cuda") // 128
    leaf = (
        logits.clone().requires_grad_()
    )  # second 5 GB copy: the loss writes its gradient over `leaf * 1`
    out = fused_multitask_cross_entropy(
        leaf * 1, labels, weights, mask, task_ids, sample_index, 3, tokens // 128
    )
    out.total.backward()
    rows = torch.arange(tokens - 256, tokens, device="cuda")  # past element 2^31
    assert int(rows[0]) * vocab > 2**31
    x = logits[rows].float().requires_grad_()
    want = F.cross_entropy(x, labels[rows], reduction="none")
    (want * weights[rows]).sum().backward()
    torch.testing.assert_close(out.per_token_loss[rows], want.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(leaf.grad[rows].float(), x.grad, rtol=2e-2, atol=2e-5)
    head = torch.arange(0, 256, device="cuda")
    torch.testing.assert_close(
        out.per_token_loss[head],
        F.cross_entropy(logits[head].float(), labels[head], reduction="none"),
        rtol=2e-2,
        atol=2e-2,
    )
    assert torch.isfinite(out.total) and torch.isfinite(out.task_sums).all()


@needs_gpu
def test_kernels_are_bitwise_deterministic_on_gpu():
    _kernels_or_fail()
    case = _case(tokens=8192, vocab=32000, tasks=8, seed=4, device="cuda")
    shuffled = case[5][
        torch.randperm(len(case[5]), device="cuda")
    ]  # samples scattered over the tokens
    case = _replace(case, 5, shuffled.contiguous())
    first = _outputs(*_run(case))
    second = _outputs(*_run(case))
    torch.cuda.synchronize()
    _assert_bitwise_equal(first, second)
    want = _reference(*case)
    torch.testing.assert_close(first[2], want[2], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(first[3], want[3], rtol=1e-4, atol=1e-3)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_rows_on_gpu_match_the_torch_path(dtype):
    _kernels_or_fail()
    case = _case_with_neg_inf_rows(dtype=dtype)
    want = _outputs(*_run(case))  # the torch path on the CPU
    got = _outputs(*_run(_cuda(case)))
    out_total, per_token, task_sums, sample_sums, grad = got
    assert per_token[6].item() == float("inf")
    assert torch.isfinite(per_token[:6]).all() and torch.isfinite(out_total)
    assert (
        torch.isfinite(task_sums).all()
        and torch.isfinite(sample_sums).all()
        and torch.isfinite(grad).all()
    )
    assert not grad[5].any() and not grad[6].any()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().to(b.dtype), b, **tol)


@needs_gpu
def test_unchecked_out_of_range_ids_are_skipped_by_the_kernels():
    _kernels_or_fail()
    case = _cuda(_case(tokens=512, vocab=1000, tasks=4))
    task_ids, sample_index, labels = case[4].clone(), case[5].clone(), case[1].clone()
    task_ids[10], task_ids[11] = -1, 1 << 40
    sample_index[20], sample_index[21] = -7, case[7]
    labels[30], labels[31] = -100, 1 << 40  # no target anywhere: loss = logsumexp
    broken = _replace(_replace(_replace(case, 4, task_ids), 5, sample_index), 1, labels)
    got, _ = _run(broken, check_ids=False)
    want, _ = _run(
        [c.cpu() if isinstance(c, torch.Tensor) else c for c in broken], check_ids=False
    )  # torch path
    torch.cuda.synchronize()
    torch.testing.assert_close(got.task_sums.cpu(), want.task_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sample_sums.cpu(), want.sample_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.per_token_loss.cpu(), want.per_token_loss, rtol=1e-5, atol=1e-5)


@needs_gpu
def test_binding_checks_raise_instead_of_crashing():
    impl = _kernels_or_fail()
    logits, labels, weights, mask, task_ids, sample_index, tasks, samples = _cuda(_case())
    stats = impl.shard_stats(logits, labels, 0)
    with pytest.raises(RuntimeError, match="task_ids must be on"):
        impl.finalize(*stats, weights, mask, task_ids.cpu(), sample_index, tasks, samples)
    with pytest.raises(RuntimeError, match="labels must be 1-D with one entry per token"):
        impl.shard_stats(logits, labels[:-1], 0)
    with pytest.raises(RuntimeError, match="scaled_weights must be (Float|float)"):
        impl.backward_inplace(logits.clone(), labels, 0, stats[0], stats[1], weights.double())
    with pytest.raises(RuntimeError, match="row_sumexp must be 1-D"):
        impl.backward_inplace(logits.clone(), labels, 0, stats[0], stats[1][:-1], weights)
    with pytest.raises(RuntimeError, match="logits must be a CUDA tensor"):
        impl.shard_stats(logits.cpu(), labels, 0)
    with pytest.raises(ValueError, match="task_ids must be on the logits' device"):
        fused_multitask_cross_entropy(
            logits * 1, labels, weights, mask, task_ids.cpu(), sample_index, tasks, samples
        )
    torch.cuda.synchronize()


class _ThreadAllReduce:
    """All-reduce between threads, one per emulated rank, folding in rank order (deterministic)."""

    def __init__(self, world):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def reducer(self, rank, fold):
        def reduce(tensor):
            self.slots[rank] = tensor
            self.barrier.wait()
            result = self.slots[0]
            for other in self.slots[1:]:
                result = fold(result, other)
            self.barrier.wait()  # every rank has read the slots
            return result.clone()

        return reduce


def _combine_shards(shards):
    """combine() on every shard's stats at once, as TP ranks do; rank 0's result."""
    allreduce, results = _ThreadAllReduce(len(shards)), [None] * len(shards)

    def rank(r):
        results[r] = combine(
            shards[r], allreduce.reducer(r, torch.maximum), allreduce.reducer(r, torch.add)
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results[0]


@needs_gpu
def test_two_vocab_shards_combine_to_the_full_result_on_gpu():
    impl = _kernels_or_fail()
    logits, labels, weights, mask, task_ids, sample_index, tasks, samples = case = _case(
        tokens=2048, vocab=32001, tasks=4, seed=9, device="cuda"
    )
    bounds = [(0, 16000), (16000, 32001)]
    shards = [
        RowStats(*impl.shard_stats(logits[:, a:b], labels, a)) for a, b in bounds
    ]  # strided views
    merged = _combine_shards(shards)
    per_token, task_sums, sample_sums, total = impl.finalize(
        merged.row_max,
        merged.row_sumexp,
        merged.row_target,
        weights,
        mask,
        task_ids,
        sample_index,
        tasks,
        samples,
    )
    want_total, want_tok, want_tasks, want_samples, want_grad = _reference(*case)
    torch.testing.assert_close(per_token, want_tok, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(task_sums, want_tasks, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sample_sums, want_samples, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(total.float(), want_total, rtol=1e-4, atol=1e-4)
    for a, b in bounds:
        grad = logits[:, a:b].contiguous()
        impl.backward_inplace(grad, labels, a, merged.row_max, merged.row_sumexp, weights)
        torch.testing.assert_close(grad, want_grad[:, a:b], rtol=1e-4, atol=1e-6)

"""The torch attention backend computes what megatron's local attention computes.

Reference: megatron-core's own DotProductAttention (the `local` backend) with the
same weights, through megatron's real schedule, in fp32 on the CPU (where the
torch backend's packed rows take its SDPA + block-diagonal mask path, built from
the same cu_seqlens that varlen_attn reads on a GPU).
"""

import attention_jobs
import pytest
import torch

from megamft.testing.distributed import launch

TOLERANCE = 1e-5

LAYOUTS = {
    # name: (world size, overrides, head layouts)
    "tp1": (1, (), ("mha", "gqa", "mqa")),
    # megamft refuses fewer KV groups than TP ranks (validation), so no MQA at TP=2.
    "tp2-sequence-parallel-selective-recompute": (
        2,
        (
            "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true",
            "transformer.recompute_granularity=selective",
        ),
        ("mha", "gqa"),
    ),
    "pp2-full-recompute": (
        2,
        (
            "parallel.pipeline_model_parallel_size=2",
            "transformer.recompute_granularity=full",
            "transformer.recompute_method=uniform",
            "transformer.recompute_num_layers=1",
        ),
        ("mha", "gqa", "mqa"),
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_backend_matches_local_attention(layout):
    world_size, overrides, heads = LAYOUTS[layout]
    results = launch(
        attention_jobs.torch_vs_local,
        world_size,
        timeout=240,
        kwargs={"overrides": overrides, "heads": heads},
    )
    for rank, result in enumerate(results):
        assert set(result) == {(h, rows) for h in heads for rows in ("unpacked", "packed")}
        for case, diff in result.items():
            assert diff["core_attention"] == "TorchCoreAttention"
            assert diff["same_names"], case
            assert diff["grad_scale"] > 1e-3, (rank, case)  # gradients that can show a difference
            assert diff["grads"] <= TOLERANCE, (rank, case, diff)
            if diff["logits"] is not None:  # the last pipeline stage
                assert diff["logit_scale"] > 0.1
                assert diff["logits"] <= TOLERANCE, (rank, case, diff)
                if case[1] == "packed":
                    assert diff["packing_effect"] > 1000 * TOLERANCE, (rank, case, diff)
        if layout.startswith("pp2"):
            assert (result[(heads[0], "packed")]["logits"] is None) == (rank == 0)


def test_packed_documents_equal_each_document_alone():
    result = launch(
        attention_jobs.packed_documents_alone, 1, timeout=120, kwargs={"micro_batch_size": 3}
    )[0]
    assert result["rows"] == 3 and result["documents"] >= 6
    assert not result["has_dense_mask"]
    assert not result["varlen_on_emulated_gpu"]  # bf16 runs on the CPU take the mask path
    assert result["max_diff"] < 1e-4, result


WINDOWED = {  # name: (world size, overrides, head layouts)
    "tp1": (1, (), ("mha", "gqa", "mqa")),
    "tp2-sequence-parallel": (
        2,
        ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"),
        ("gqa",),
    ),
}


@pytest.mark.parametrize("layout", list(WINDOWED))
def test_torch_backend_sliding_window_matches_local_attention(layout):
    """megatron's local attention applies the window in its softmax; the torch backend as a banded mask
    here (varlen's window_size on a GPU). Rows of 48 tokens, window 12."""
    world_size, overrides, heads = WINDOWED[layout]
    results = launch(
        attention_jobs.windowed_torch_vs_local,
        world_size,
        timeout=240,
        kwargs={"overrides": overrides, "heads": heads, "window": 12},
    )
    for rank, result in enumerate(results):
        assert sorted(result) == sorted(heads)
        for name, diff in result.items():
            assert diff["window"] == (11, 0)  # HF's window counts the token itself
            assert diff["window_effect"] > 0.1, (rank, name, diff)  # the window changes the logits
            assert diff["logits"] <= TOLERANCE, (rank, name, diff)
            assert diff["grad_scale"] > 1e-3 and diff["grads"] <= TOLERANCE, (rank, name, diff)


def test_packed_documents_under_a_sliding_window_equal_each_document_alone():
    result = launch(
        attention_jobs.packed_documents_alone,
        1,
        timeout=120,
        kwargs={"micro_batch_size": 2, "window": 24},
    )[0]
    assert (
        result["documents"] >= 4 and result["longest_document"] > 2 * 24
    )  # documents the window cuts
    assert result["max_diff"] < 1e-4, result


def test_block_diagonal_mask_from_cu_seqlens_matches_the_documents():
    from megamft.data.sequences import document_attention_mask, document_boundaries
    from megamft.model.attention import block_diagonal_causal

    sample_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    allowed = block_diagonal_causal(document_boundaries(sample_ids.numpy()), 2, 8)
    assert torch.equal(allowed, ~document_attention_mask(sample_ids))


def test_varlen_path_is_chosen_only_where_flash_runs():
    from megamft.model.attention import varlen_available

    assert not varlen_available(torch.zeros(2, 2, dtype=torch.bfloat16))  # a host tensor
    if torch.cuda.is_available():
        assert varlen_available(torch.zeros(2, 2, dtype=torch.bfloat16, device="cuda"))
        assert not varlen_available(torch.zeros(2, 2, device="cuda"))  # fp32: SDPA with the mask


def test_flash_attention_impl_is_checked_and_named_in_its_errors():
    from megamft.config import ConfigError, load_config
    from megamft.model.attention import activate_flash_attention

    with pytest.raises(ConfigError, match="flash_attention_impl"):
        load_config([], ["model.flash_attention_impl=FA2"])
    assert load_config([], ["model.flash_attention_impl=FA3"]).model.flash_attention_impl == "FA3"
    assert "ignored: no CUDA" in activate_flash_attention("FA3", cuda=False)
    assert "FlashAttention-2" in activate_flash_attention(None, cuda=True)
    if torch.cuda.is_available():
        try:
            import flash_attn_interface  # noqa: F401
        except (
            ImportError
        ):  # without FlashAttention-3's package: one error naming the key and the package
            with pytest.raises(
                ValueError, match=r"model.flash_attention_impl=FA3 needs flash_attn_interface"
            ):
                activate_flash_attention("FA3", cuda=True)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="varlen_attn is CUDA-only (the GPU check runs this)"
)
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_flash_varlen_matches_the_masked_reference_on_cuda(window, kv_heads):
    """bf16 flash varlen over documents (and plain rows under a window) vs fp32 SDPA with the same mask."""
    import numpy as np

    from megamft.data.sequences import document_boundaries
    from megamft.model.attention import (
        RowDocuments,
        block_diagonal_causal,
        flash_varlen_attention,
        sliding_window_causal,
        varlen_available,
        whole_rows,
    )

    rows, s, heads, dim = 2, 256, 8, 64
    g = torch.Generator().manual_seed(0)
    segments = np.repeat(np.arange(8), s // 4).reshape(rows, s)  # 4 documents of 64 per row
    cu = document_boundaries(segments).cuda()
    packed = RowDocuments(
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=s,
        max_seqlen_kv=s,
        qkv_format="sbhd",
        max_document_length=64,
    )
    for documents in (packed, whole_rows(rows, s, "cuda")) if window else (packed,):
        q, k, v = (
            torch.randn(s, rows, n, dim, generator=g).cuda().requires_grad_()
            for n in (heads, kv_heads, kv_heads)
        )
        assert varlen_available(q.bfloat16())
        scale = dim**-0.5
        out = flash_varlen_attention(
            *(t.bfloat16() for t in (q, k, v)), documents, scale, (window, 0) if window else (-1, 0)
        )
        out.float().square().sum().backward()
        got = [out.float()] + [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        allowed = block_diagonal_causal(documents.cu_seqlens_q, rows, s)
        if window:
            allowed = allowed & sliding_window_causal(s, window, "cuda")
        qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        want = torch.nn.functional.scaled_dot_product_attention(
            qq, kk, vv, attn_mask=allowed, scale=scale, enable_gqa=heads != kv_heads
        ).permute(2, 0, 1, 3)
        want.square().sum().backward()
        for a, b in zip(got, [want] + [t.grad for t in (q, k, v)]):  # bf16 inputs: ~1% of the scale
            assert float((a - b).abs().max()) <= 2e-2 * float(b.abs().max()), float(
                (a - b).abs().max()
            )


def test_core_attention_gets_bf16_inputs_in_a_bf16_run():
    """varlen_attn runs only on bf16/fp16 inputs: q and k must stay bf16 through megatron's RoPE (whose
    cos/sin are fp32), or every packed row on a GPU would silently take the dense-mask path."""
    seen = launch(attention_jobs.core_attention_input_dtypes, 1, timeout=120)[0]
    assert len(seen) == 4 and set(seen) == {("torch.bfloat16",) * 3}, seen

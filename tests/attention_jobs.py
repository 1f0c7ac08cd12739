"""Multi-process jobs comparing the torch attention backend with megatron's local attention.

Kept out of test modules so that each rank imports only this small file (and jobs.py).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).parent)
)  # ranks load this file by path; `jobs` lives beside it

HEAD_LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}  # query groups for 4 query heads


def _packed_rows(rows: int, seq: int, vocab: int, seed: int) -> dict:
    """Rows of 1-4 documents each (a padding block included), with both forms of their boundaries."""
    import numpy as np
    import torch

    from megamft.data.attention_boundaries import row_documents
    from megamft.data.sequences import document_attention_mask, document_boundaries

    g = torch.Generator().manual_seed(seed)
    sample_ids = torch.zeros(rows, seq, dtype=torch.long)
    positions = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(torch.randperm(seq - 2, generator=g)[: r % 4].add(1).tolist())
        for doc, (a, b) in enumerate(zip([0, *cuts], [*cuts, seq])):
            sample_ids[r, a:b] = doc
            positions[r, a:b] = torch.arange(b - a)
    batch = {
        "tokens": torch.randint(0, vocab, (rows, seq), generator=g),
        "labels": torch.randint(0, vocab, (rows, seq), generator=g),
        "weights": torch.rand(rows, seq, generator=g),
        "position_ids": positions,
        "attention_mask": document_attention_mask(sample_ids),
        "cu_seqlens": document_boundaries(np.asarray(sample_ids)),
    }
    batch["packed_seq_params"] = row_documents(batch)
    return batch


def _forward_backward(
    state, micro_batches: list[dict], packed_as: str | None
) -> tuple[list, object]:
    """megatron's schedule over the micro-batches: (last stage's logits per micro-batch, gradients).

    packed_as: None (plain causal rows), "mask" (dense mask) or "rows" (RowDocuments).
    The loss is Σ weight x vocab-parallel cross entropy, so every logit gets a gradient.
    """
    from functools import partial

    import torch
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megamft.training.step import to_device

    def loss_func(batch, logits):
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"])
        loss = (ce * batch["weights"]).sum()
        return (
            loss,
            torch.tensor(batch["labels"].numel(), device="cuda", dtype=torch.int),
            {"logits": logits.detach().cpu()},
        )

    def forward_step(iterator, model):
        batch = to_device(next(iterator))
        mask = batch["attention_mask"] if packed_as == "mask" else None
        packed = batch["packed_seq_params"] if packed_as == "rows" else None
        return model(
            batch["tokens"], batch["position_ids"], mask, packed_seq_params=packed
        ), partial(loss_func, batch)

    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    keep = ("tokens", "labels", "weights", "position_ids", "attention_mask", "packed_seq_params")
    batches = [{k: b[k] for k in keep} for b in micro_batches]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=state.chunks,
        num_microbatches=len(batches),
        seq_length=batches[0]["tokens"].shape[1],
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=False,
    )
    grads = {
        name: p.main_grad.detach().clone().cpu()
        for chunk in state.chunks
        for name, p in chunk.module.named_parameters()
    }
    return [out["logits"] for out in outputs], grads


@contextlib.contextmanager
def _models_on_rows(overrides: tuple[str, ...]):
    """(build, batches): build(*overrides) makes the test model on this rank's process group; batches are
    two micro-batches of two packed rows of 48 tokens."""
    from jobs import tiny_config

    from megamft.data.tokenizer import ByteTokenizer
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state

    # Weights large enough that attention is far from uniform and logits are O(1).
    base = (
        "optimizer.use_distributed_optimizer=false",
        "train.micro_batch_size=2",
        "model.init_method_std=0.3",
        *overrides,
    )
    runtime = distributed.initialize(tiny_config(*base))
    try:
        vocab = ByteTokenizer().vocab_size

        def build(*more: str):
            return build_training_state(tiny_config(*base, *more), runtime, vocab)

        yield build, [_packed_rows(2, 48, vocab, seed) for seed in range(2)]
    finally:
        distributed.shutdown()


def _same_weights(source, *targets) -> None:
    for chunks in zip(source.chunks, *(t.chunks for t in targets)):
        for chunk in chunks[1:]:
            chunk.module.load_state_dict(chunks[0].module.state_dict())


def _largest_difference(got: list, want: list):
    """max |got - want| over paired tensors (None on a pipeline stage without logits)."""
    return max((float((g - w).abs().max()) for g, w in zip(got, want)), default=None)


def _gradient_differences(got: dict, want: dict) -> dict:
    return {
        "grads": max(float((got[k] - want[k]).abs().max()) for k in want),
        "grad_scale": max(float(g.abs().max()) for g in want.values()),
        "same_names": sorted(got) == sorted(want),
    }


def torch_vs_local(overrides: tuple[str, ...], heads: tuple[str, ...]) -> dict:
    """For each head layout: max |torch - local| of logits and gradients, packed and unpacked rows."""
    out = {}
    with _models_on_rows(overrides) as (build, batches):
        for name in heads:
            model = (f"model.num_query_groups={HEAD_LAYOUTS[name]}",)
            local, fast = (
                build(*model, "model.attention_backend=local"),
                build(*model, "model.attention_backend=torch"),
            )
            _same_weights(local, fast)
            causal_logits = None
            for rows, local_form, torch_form in (
                ("unpacked", None, None),
                ("packed", "mask", "rows"),
            ):
                want_logits, want_grads = _forward_backward(local, batches, local_form)
                causal_logits = causal_logits or want_logits
                got_logits, got_grads = _forward_backward(fast, batches, torch_form)
                out[(name, rows)] = {
                    "logits": _largest_difference(got_logits, want_logits),
                    "logit_scale": max((float(w.abs().max()) for w in want_logits), default=None),
                    # how far packing moves the logits: what a backend ignoring the boundaries would miss
                    "packing_effect": _largest_difference(want_logits, causal_logits),
                    **_gradient_differences(got_grads, want_grads),
                    "core_attention": type(
                        fast.chunks[0].module.decoder.layers[0].self_attention.core_attention
                    ).__name__,
                }
    return out


def windowed_torch_vs_local(
    overrides: tuple[str, ...], heads: tuple[str, ...], window: int
) -> dict:
    """For each head layout, plain causal rows under a sliding window: max |torch - local| of logits
    and gradients, and how far the window moves local's logits (what ignoring it would miss)."""
    out = {}
    with _models_on_rows(overrides) as (build, batches):
        for name in heads:
            model = (f"model.num_query_groups={HEAD_LAYOUTS[name]}",)
            windowed = (f"model.sliding_window={window}",)
            full = build(*model, "model.attention_backend=local")
            local = build(*model, "model.attention_backend=local", *windowed)
            fast = build(*model, "model.attention_backend=torch", *windowed)
            _same_weights(full, local, fast)
            full_logits, _ = _forward_backward(full, batches, None)
            want_logits, want_grads = _forward_backward(local, batches, None)
            got_logits, got_grads = _forward_backward(fast, batches, None)
            out[name] = {
                "logits": _largest_difference(got_logits, want_logits),
                "window_effect": _largest_difference(want_logits, full_logits),
                **_gradient_differences(got_grads, want_grads),
                "window": fast.chunks[0]
                .module.decoder.layers[0]
                .self_attention.core_attention.window,
            }
    return out


def packed_documents_alone(micro_batch_size: int, window: int | None = None) -> dict:
    """torch backend, RowDocuments: per-token losses of packed rows vs each document run alone
    (with `window`, under that sliding window in both)."""
    import torch
    from jobs import max_diffs_to_documents_alone, tiny_model

    from megamft.data.attention_boundaries import row_documents
    from megamft.data.sequences import collate
    from megamft.training.step import to_device

    windowed = (f"model.sliding_window={window}",) if window else ()
    with tiny_model(
        "data.mode=pack", "data.seq_length=512", "model.attention_backend=torch", *windowed
    ) as (cfg, data, state):
        model = state.chunks[0].module
        model.eval()
        rows = [row for row in data.train_rows(0, 16, 0, 1) if len(row[0]) >= 2][:micro_batch_size]
        packed = collate(
            rows, data.stores, "pack", cfg.data.seq_length, data.pad_id, dense_mask=False
        )
        packed["packed_seq_params"] = row_documents(packed)
        packed = to_device(packed)
        with torch.no_grad():
            together = model(
                packed["tokens"],
                packed["position_ids"],
                None,
                labels=packed["labels"],
                packed_seq_params=packed["packed_seq_params"],
            )
        (max_diff,), documents = max_diffs_to_documents_alone(model, data, rows, together)
        longest = max(
            int(data.stores[t].lengths[d]) - 1 for tasks, docs in rows for t, d in zip(tasks, docs)
        )
        from megamft.model.attention import varlen_available

        emulated_bf16 = torch.zeros(
            2, dtype=torch.bfloat16, device="cuda"
        )  # reports is_cuda, no flash kernel
        return {
            "max_diff": max_diff,
            "documents": documents,
            "rows": len(rows),
            "longest_document": longest,
            "has_dense_mask": "attention_mask" in packed,
            "varlen_on_emulated_gpu": varlen_available(emulated_bf16),
        }


def core_attention_input_dtypes() -> list:
    """The dtypes of query, key and value reaching the torch backend's core attention in a bf16 run."""
    import torch
    from jobs import first_batches, tiny_model

    from megamft.data.attention_boundaries import row_documents
    from megamft.training.step import to_device

    with tiny_model("train.precision=bf16", "data.mode=pack", "model.attention_backend=torch") as (
        cfg,
        data,
        state,
    ):
        seen = []
        for layer in state.chunks[0].module.module.decoder.layers:
            layer.self_attention.core_attention.register_forward_pre_hook(
                lambda module, args: seen.append(tuple(str(t.dtype) for t in args[:3]))
            )
        batch = first_batches(data, 2, 2)[0]
        batch["packed_seq_params"] = row_documents(batch)
        batch = to_device(batch)
        with torch.no_grad():
            state.chunks[0](
                batch["tokens"],
                batch["position_ids"],
                None,
                packed_seq_params=batch["packed_seq_params"],
            )
        return seen

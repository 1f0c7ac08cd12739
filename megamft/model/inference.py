"""Forward passes outside training: full logits at any TP/PP layout."""

from __future__ import annotations

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


def _collect_logits(output: torch.Tensor):
    # megatron's loss_func protocol: (loss, token count, data to keep)
    full = gather_from_tensor_model_parallel_region(output)
    return (
        output.new_zeros(()),
        torch.ones((), dtype=torch.int, device=output.device),
        {"logits": full.detach()},
    )


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    return model(batch["tokens"], batch["position_ids"], None), _collect_logits


@torch.no_grad()
def full_logits(chunks: list, tokens: torch.Tensor) -> torch.Tensor | None:
    """[batch, seq, padded vocab] logits (on the device) on the last pipeline stage; None on other stages."""
    tokens = tokens.to(torch.cuda.current_device())
    batch = {
        "tokens": tokens,
        "position_ids": torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens),
    }
    iterators = [iter([batch]) for _ in chunks]
    for chunk in chunks:
        chunk.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
    )
    return outputs[0]["logits"] if outputs else None

"""Text generation at the training layout: megatron's GPTModel with megatron-core's static KV cache.

One prompt at a time, its n samples as the rows of one batch: a prefill of the prompt, then one
token per forward pass, keys and values kept in megatron's ``StaticInferenceContext`` (the cache
its attention layers fill themselves, ``Attention._adjust_key_value_for_inference``). Tensor
parallel ranks compute the same (gathered) logits; pipeline stages pass hidden states with
megatron's inference p2p helpers (a ring, so virtual pipeline chunks work too) and the last stage
broadcasts each chosen token. Sequence parallelism is switched off while generating, as
megatron's own text generation does (one token cannot be split over TP ranks).

Every data-parallel replica generates its own prompts; ranks call `generate` in lockstep over
`lockstep` (a host-side group of the DP ranks): each decoding step goes on while any replica still
generates, so collectives that span replicas (expert parallelism's all-to-all) always match.
Greedy decoding takes the argmax; sampling draws from `torch.Generator`s seeded per prompt, so the
training RNG streams are untouched. Only the tokenizer's ids are candidates (padded vocabulary rows
never are).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.inference.communication_utils import (
    broadcast_from_last_pipeline_stage,
    recv_from_prev_pipeline_rank_,
    send_to_next_pipeline_rank,
)
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.utils import set_model_to_sequence_parallel


@dataclass(frozen=True)
class Sampling:
    """How each token is chosen: greedy when temperature is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    vocab_size: int | None = None
    """Only ids below this are candidates (the tokenizer's; None: every logit)."""


def _models(chunks) -> list:
    """Each chunk without megatron's DDP wrapper (its hooks gather parameters, which `generating` did)."""
    return [chunk.module if hasattr(chunk, "ddp_config") else chunk for chunk in chunks]


def _gpt(model):
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def generating(chunks):
    """Models in eval mode, parameters gathered, sequence parallelism off; all restored after."""
    from megamft.model.chunks import gather_parameters

    gather_parameters(chunks)
    models = _models(chunks)
    sequence_parallel = [_gpt(m).config.sequence_parallel for m in models]
    training = [m.training for m in models]
    try:
        for model, was in zip(models, sequence_parallel):
            model.eval()
            if was:
                set_model_to_sequence_parallel(_gpt(model), False)
        yield models
    finally:
        for model, was, mode in zip(models, sequence_parallel, training):
            if was:
                set_model_to_sequence_parallel(_gpt(model), True)
            model.train(mode)


def _stage_forward(
    models, tokens: torch.Tensor, positions: torch.Tensor, context
) -> torch.Tensor | None:
    """One pass through every pipeline stage and virtual chunk: the last position's logits
    [rows, vocab] on the last stage, None elsewhere."""
    first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    config = _gpt(models[0]).config
    output = None
    for index, model in enumerate(models):
        first, last = first_stage and index == 0, last_stage and index == len(models) - 1
        if not first:
            shape = (tokens.shape[1], tokens.shape[0], config.hidden_size)
            received = torch.empty(
                shape,
                dtype=config.pipeline_dtype or config.params_dtype,
                device=torch.cuda.current_device(),
            )
            recv_from_prev_pipeline_rank_(received)
            model.set_input_tensor(received)
        output = model(
            tokens, positions, None, inference_context=context, runtime_gather_output=True
        )
        if not last:
            send_to_next_pipeline_rank(output.contiguous())
    return output[:, -1, :].float() if last_stage else None


def _choose(logits: torch.Tensor, sampling: Sampling, generators: list) -> torch.Tensor:
    """The next token of each row: argmax, or a draw from the temperature- and top-p-shaped distribution."""
    if sampling.vocab_size is not None:
        logits = logits[:, : sampling.vocab_size]
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    outside = (
        ordered.cumsum(dim=-1) - ordered > sampling.top_p
    )  # the mass before a token already reaches top_p
    ordered = ordered.masked_fill(outside, 0.0)
    picks = [torch.multinomial(row, 1, generator=g) for row, g in zip(ordered, generators)]
    return order.gather(-1, torch.cat(picks).view(-1, 1)).view(-1)


def _generators(seed: int, rows: int) -> list[torch.Generator]:
    """One generator per row on the logits' device (the CPU under the emulation), apart from torch's own."""
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    )
    return [torch.Generator(device=device).manual_seed(seed * 1000003 + row) for row in range(rows)]


def _still_running(running: bool, lockstep) -> bool:
    flag = torch.tensor([1 if running else 0], dtype=torch.int64)
    if lockstep is not None:
        torch.distributed.all_reduce(flag, group=lockstep)
    return bool(flag.item())


@torch.no_grad()
def generate(
    models,
    prompt: list[int] | None,
    n: int,
    max_new_tokens: int,
    eos_id: int,
    sampling: Sampling,
    seed: int = 0,
    lockstep=None,
) -> list[list[int]]:
    """n continuations of `prompt` (each up to its EOS, which is left out), on every rank of the replica.

    `models`: from `generating`. A rank whose replica has no prompt left passes None and takes part in
    the lockstep only (an empty result). Every rank of `lockstep` must make the same number of calls.
    """
    ids = prompt if prompt else [eos_id]
    device = torch.cuda.current_device()
    context = StaticInferenceContext(n, len(ids) + max_new_tokens)
    tokens = torch.tensor([ids] * n, dtype=torch.int64, device=device)
    positions = torch.arange(len(ids), device=device).expand(n, -1)
    generators = _generators(seed, n) if sampling.temperature > 0 else []
    out, done = [[] for _ in range(n)], [False] * n
    step = 0
    while _still_running(prompt is not None and not all(done) and step < max_new_tokens, lockstep):
        logits = _stage_forward(models, tokens, positions, context)
        chosen = _choose(logits, sampling, generators) if logits is not None else None
        chosen = broadcast_from_last_pipeline_stage([n], torch.int64, chosen)
        context.sequence_len_offset += tokens.shape[1]
        context.enable_decode_mode()
        for row, token in enumerate(chosen.tolist()):
            done[row] = done[row] or token == eos_id
            if not done[row]:
                out[row].append(token)
        step += 1
        tokens, positions = (
            chosen.view(n, 1),
            torch.full((n, 1), context.sequence_len_offset, device=device),
        )
    return out if prompt is not None else []

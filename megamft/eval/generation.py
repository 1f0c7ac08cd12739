"""Sampling completions from a Hugging Face model folder: transformers, or vLLM when installed."""

from __future__ import annotations

from pathlib import Path

import torch


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class TransformersGenerator:
    """`model.generate` of transformers, one prompt at a time, seeded per call."""

    def __init__(
        self, folder: str | Path, device: str | None = None, dtype: torch.dtype | None = None
    ):
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = (
            AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or "auto")
            .to(self.device)
            .eval()
        )

    @torch.no_grad()
    def generate(
        self,
        ids: list[int],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        seed: int,
    ) -> list[list[int]]:
        torch.manual_seed(seed)
        prompt = torch.tensor([ids], device=self.device)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        out = self.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            **sampling,
        )
        return [_until_eos(row[len(ids) :].tolist(), eos_id) for row in out]


class VLLMGenerator:
    """vLLM's offline engine (used when vLLM is installed and the backend is 'auto' or 'vllm')."""

    def __init__(self, folder: str | Path):
        from vllm import LLM

        self.llm = LLM(model=str(folder))

    def generate(self, ids, n, temperature, top_p, max_new_tokens, eos_id, pad_id, seed):
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
            seed=seed,
        )
        result = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        return [_until_eos(list(o.token_ids), eos_id) for o in result.outputs]


def make_generator(folder: str | Path, backend: str = "auto"):
    if backend == "vllm" or (backend == "auto" and vllm_available()):
        return VLLMGenerator(folder)
    return TransformersGenerator(folder)


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids

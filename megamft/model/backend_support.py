"""Which attention backend (te, torch, local) computes which model; `auto` avoids one that would not.

- Attention soft-capping (Gemma 2): the torch backend only (see softcap).
- Norms after attention and MLP (Gemma 2): megatron's local layer (torch and local backends).
- Multi-latent attention and dense first layers among MoE layers (DeepSeek-V2): megatron's local layer;
  Transformer Engine's MLA layer spec exists in megatron-core, but megamft's te spec builds one layer kind
  and is not verified for MLA, so it is refused rather than run unverified.
"""

from __future__ import annotations

from typing import Optional

from megamft.config import ModelConfig


def backend_problem(model: ModelConfig, backend: str) -> Optional[str]:
    """Why an attention backend (te, torch or local) would not compute this model (None: it would)."""
    if model.attention_logit_softcap and backend != "torch":
        return (
            f"model.attention_logit_softcap={model.attention_logit_softcap} (attention soft-capping) is "
            f"computed by the torch attention backend only; model.attention_backend={backend} has no soft-cap"
        )
    if backend != "te":
        return None
    if model.post_sublayer_norms:
        return (
            "model.post_sublayer_norms (norms after attention and MLP) are built in megatron's local layer "
            "only; use model.attention_backend=torch"
        )
    if model.multi_latent_attention or model.moe_first_dense_layers:
        return (
            "model.multi_latent_attention / model.moe_first_dense_layers (DeepSeek-V2) are built in megatron's "
            "local layer only; use model.attention_backend=torch"
        )
    return None

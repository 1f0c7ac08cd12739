"""Core attention on torch's own kernels: the `torch` attention backend.

A drop-in for megatron-core's ``DotProductAttention`` in the layer spec (same
constructor and forward signature, query/key/value as ``[s, b, heads, dim]``,
output ``[s, b, heads * dim]``), so megatron's ``SelfAttention`` and
``TransformerLayer`` stay as they are: QKV projection, RoPE, TP/SP, PP and
activation recompute all happen outside this module.

- Causal rows: ``scaled_dot_product_attention(is_causal=True)``. No mask is
  built; on CUDA this picks the flash, cuDNN or memory-efficient kernel, whose
  memory is linear in the sequence length. GQA/MQA via ``enable_gqa`` (K/V are
  not repeated).
- Packed rows (several documents per row) arrive as ``RowDocuments``, whose
  ``cu_seqlens`` cut the flattened ``[b * s]`` tokens at every document and
  row start. On CUDA in bf16/fp16 they go to ``varlen_attn`` (flash attention
  over cu_seqlens, ``window_size=(-1, 0)`` for causal). Elsewhere (the CPU,
  fp32, attention dropout) SDPA computes the same result with a
  block-diagonal causal mask built from the same cu_seqlens on the device:
  exact, but quadratic in memory.
- An explicit dense mask (``[b, 1, s, s]``, True = blocked, megatron's
  convention) is honoured as the local spec honours it.
- A sliding window (``config.window_size = (left, 0)``, megatron's and flash
  attention's convention: a token sees itself and ``left`` tokens before it)
  goes to ``varlen_attn``'s ``window_size`` on CUDA in bf16/fp16, packed rows
  and plain rows alike (plain rows as one document each), so its memory stays
  linear; elsewhere SDPA applies it as a banded mask. Layers that
  ``window_attn_skip_freq`` leaves global attend without a window, as in
  megatron's local attention.
- Attention logit soft-capping (Gemma 2's ``cap * tanh(score / cap)``), which
  no fused kernel here computes, takes ``softcap.softcapped_attention``: the
  scores are materialized, quadratic in memory, with the same masks.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from megamft.config import ConfigError
from megamft.data.attention_boundaries import RowDocuments
from megamft.model.softcap import softcapped_attention

log = logging.getLogger(__name__)


@functools.cache
def _varlen_keywords() -> frozenset[str]:
    """The keyword arguments this torch's varlen_attn takes; empty where it has none we can use.

    torch 2.10 has no window_size (is_causal instead), and enable_gqa arrived after
    window_size (torch 2.12): without window_size the module takes the SDPA path,
    without enable_gqa the flash kernel still reads grouped K/V heads natively.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn

        keywords = frozenset(inspect.signature(varlen_attn).parameters)
    except ImportError:
        keywords = frozenset()
    if not {"scale", "window_size"} <= keywords:
        log.warning(
            "torch %s has no usable varlen_attn (scale and window_size): packed rows and windows take "
            "SDPA with a dense mask, quadratic in the sequence length; torch 2.13 (megamft's pin) has it",
            torch.__version__,
        )
        return frozenset()
    return keywords


def varlen_available(query: torch.Tensor) -> bool:
    """Whether torch's flash varlen kernel can run on these tensors.

    torch.cuda.is_available() too: under the CPU emulation, tensors standing for GPU memory
    report is_cuda, but no flash kernel exists for them. The head dimension must be a
    multiple of 8 up to 256: varlen_attn calls the flash kernel directly, without the
    padding SDPA adds.
    """
    head_dim = query.shape[-1]
    return (
        torch.cuda.is_available()
        and query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and bool(_varlen_keywords())
    )


class TorchCoreAttention(MegatronModule):
    """softmax(q k^T * scale) v over this TP rank's heads, on torch's fused kernels."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        softcap: Optional[float] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "the torch attention backend has no context parallelism; "
                "use model.attention_backend=te (Transformer Engine) for context_parallel_size > 1"
            )
        self.window = None
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            left, right = config.window_size
            if right != 0:
                raise ValueError(
                    f"the torch attention backend takes causal windows only: window_size=(left, 0), "
                    f"got {tuple(config.window_size)}"
                )
            self.window = (left, 0)
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"the torch attention backend supports softmax_type='vanilla' only, "
                f"not {config.softmax_type!r}"
            )
        self.attn_mask_type = attn_mask_type
        head_dim = (
            k_channels or config.kv_channels
        )  # multi-latent attention: queries/keys wider than values
        self.softcap = softcap
        # megatron's apply_query_key_layer_scaling divides the scale by the layer number and its
        # softmax multiplies it back: no net effect on the result, so it is not repeated here.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("the torch attention backend takes no attention_bias")
        if packed_seq_params is not None and not isinstance(packed_seq_params, RowDocuments):
            raise ValueError(
                f"the torch attention backend reads packed rows as RowDocuments, got "
                f"{type(packed_seq_params).__name__} (qkv_format={packed_seq_params.qkv_format!r})"
            )
        s, b = query.shape[:2]
        value_width = value.shape[-1]
        query, key, value = _one_head_width(query, key, value)
        dropout = self.dropout if self.training else 0.0
        documents = packed_seq_params
        flash_varlen = dropout == 0.0 and varlen_available(query) and self.softcap is None
        if (
            flash_varlen
            and documents is None
            and self.window is not None
            and attention_mask is None
        ):
            documents = whole_rows(
                b, s, query.device
            )  # varlen's window keeps plain rows linear too
        with self._dropout_rng(dropout):
            if flash_varlen and documents is not None:
                window = self.window or (-1, 0)
                context = flash_varlen_attention(
                    query, key, value, documents, self.softmax_scale, window
                )
            else:
                allowed = None if attention_mask is None else ~attention_mask
                if packed_seq_params is not None:
                    allowed = block_diagonal_causal(packed_seq_params.cu_seqlens_q, b, s)
                if self.window is not None:
                    window = sliding_window_causal(
                        s, self.window[0], query.device, keys=key.shape[0]
                    )
                    allowed = window if allowed is None else allowed & window
                causal = (
                    allowed is None
                    and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
                )
                if self.softcap is None:
                    context = _sdpa(query, key, value, allowed, causal, dropout, self.softmax_scale)
                else:
                    context = softcapped_attention(
                        query,
                        key,
                        value,
                        allowed,
                        causal,
                        dropout,
                        self.softmax_scale,
                        self.softcap,
                    )
        return context[..., :value_width].reshape(s, b, -1)

    def _dropout_rng(self, dropout: float):
        """megatron's rule: dropout draws from the TP-aware CUDA RNG tracker unless sequence parallel."""
        if dropout > 0.0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


def _one_head_width(query, key, value):
    """q, k and v of one head width, the narrower zero-padded: flash kernels (and torch's fused CPU kernel)
    take one width, and multi-latent attention's values are narrower than its queries and keys. Zero columns
    change no score (q.k) and give zero output columns, which the caller drops."""
    width = max(query.shape[-1], value.shape[-1])
    if query.shape[-1] < width:
        query, key = (F.pad(t, (0, width - t.shape[-1])) for t in (query, key))
    if value.shape[-1] < width:
        value = F.pad(value, (0, width - value.shape[-1]))
    return query, key, value


def _sdpa(
    query, key, value, allowed: Optional[torch.Tensor], causal: bool, dropout: float, scale: float
):
    """[s, b, h, d] in and out; `allowed` in SDPA's convention (True = may attend)."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=allowed,
        dropout_p=dropout,
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.permute(2, 0, 1, 3)


def flash_varlen_attention(
    query, key, value, documents: RowDocuments, scale: float, window: tuple[int, int]
) -> torch.Tensor:
    """Flash attention over the documents of the flattened rows; [s, b, h, d] in and out.

    window: (-1, 0) causal, (left, 0) causal within a sliding window.
    """
    from torch.nn.attention.varlen import varlen_attn

    s, b = query.shape[:2]
    q, k, v = (t.transpose(0, 1).reshape(b * s, *t.shape[2:]) for t in (query, key, value))
    longest = documents.max_document_length or s
    grouped = (
        {"enable_gqa": True}
        if q.shape[1] != k.shape[1] and "enable_gqa" in _varlen_keywords()
        else {}
    )
    # window_size must be a tuple: varlen_attn takes the causal kernel only for exactly (-1, 0).
    out = varlen_attn(
        q,
        k,
        v,
        documents.cu_seqlens_q,
        documents.cu_seqlens_kv,
        longest,
        longest,
        scale=scale,
        window_size=tuple(window),
        **grouped,
    )
    return out.reshape(b, s, *out.shape[1:]).transpose(0, 1)


def whole_rows(rows: int, length: int, device) -> RowDocuments:
    """Each row one document: cu_seqlens 0, s, 2s, ... made on the device (no host copy, no sync)."""
    cu_seqlens = torch.arange(0, (rows + 1) * length, length, dtype=torch.int32, device=device)
    return RowDocuments(
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=length,
        max_seqlen_kv=length,
        qkv_format="sbhd",
        max_document_length=length,
    )


def sliding_window_causal(length: int, left: int, device, keys: int | None = None) -> torch.Tensor:
    """[s, keys] boolean, True where query i may attend key j: i - left <= j <= i, the queries being the
    last `length` of the `keys` positions (keys > length when decoding over a KV cache)."""
    keys = keys or length
    behind = (torch.arange(length, device=device) + keys - length).view(-1, 1) - torch.arange(
        keys, device=device
    ).view(1, -1)
    return (behind >= 0) & (behind <= left)


def block_diagonal_causal(cu_seqlens: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """[rows, 1, s, s] boolean, True where a position may attend: same document, not in the future.

    Built on cu_seqlens' device from cu_seqlens alone (searchsorted: no host sync).
    """
    index = torch.arange(rows * length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    document = torch.searchsorted(cu_seqlens[1:], index, right=True).view(rows, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=cu_seqlens.device).tril()
    return ((document.unsqueeze(2) == document.unsqueeze(1)) & causal).unsqueeze(1)


_FLASH_PACKAGES = {
    "FA3": "flash_attn_interface (FlashAttention-3's hopper/ build)",
    "FA4": "flash_attn.cute (FlashAttention's CuTe DSL kernels)",
}


def activate_flash_attention(impl: str | None, cuda: bool) -> str:
    """Switch torch's flash kernels to `impl` (model.flash_attention_impl); what runs, for the log."""
    if impl is None:
        return "torch's built-in FlashAttention-2"
    if not cuda:
        return f"model.flash_attention_impl={impl} ignored: no CUDA"
    from torch.nn import attention

    if impl not in attention.list_flash_attention_impls():
        raise ConfigError(
            f"model.flash_attention_impl={impl}: this torch ({torch.__version__}) offers "
            f"{attention.list_flash_attention_impls()}; remove the key or upgrade torch"
        )
    try:
        attention.activate_flash_attention_impl(impl)
    except (ImportError, RuntimeError) as error:
        raise ConfigError(
            f"model.flash_attention_impl={impl} needs {_FLASH_PACKAGES[impl]} installed for this "
            f"torch ({error}); install it or remove the key to use torch's FlashAttention-2"
        ) from error
    return f"{impl} (model.flash_attention_impl)"

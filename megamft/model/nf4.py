"""Frozen weights stored as 4-bit NormalFloat (QLoRA's NF4) with double quantization, via bitsandbytes.

bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
splits the flattened tensor into blocks of 64 values, stores each value as a
4-bit index into the 16 NF4 levels scaled by its block's absolute maximum,
and quantizes those maxima to 8 bits in blocks of 256 around their mean (the
"double quantization"). That is 4 + 8/64 + 32/(64 x 256) = 4.127 bits a value
(0.516 bytes; without double quantization 4.5 bits, 0.5625 bytes).
dequantize_4bit gives the weight back in the dtype it was quantized from.

The linear computes in that dtype from a weight dequantized in forward and
again in backward, so nothing the size of the weight is kept between them
(bitsandbytes' own MatMul4Bit works the same way).
"""

from __future__ import annotations

import torch

from megamft.sizing.quantization import BLOCK


def _functional():
    try:
        import bitsandbytes.functional as bnb
    except ImportError as err:  # an optional extra: only QLoRA runs need it
        raise ImportError(
            "lora.quantize_base=nf4 needs bitsandbytes: pip install '.[qlora]' "
            f"(bitsandbytes==0.50.2) ({err})"
        ) from err
    return bnb


class NF4Statistics(torch.nn.Module):
    """What dequantizes a packed NF4 tensor: bitsandbytes' block maxima (8-bit, double-quantized), their
    fp32 maxima and offset, and the two code tables, as buffers; with the tensor's shape and dtype.

    The buffers are not persistent: checkpoints hold the full-precision base (see the LoRA layers'
    sharded_state_dict), never the codes.
    """

    def __init__(self, state, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.shape, self.dtype = shape, dtype
        self.blocksize, self.nested_blocksize = state.blocksize, state.state2.blocksize
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.register_buffer("code", state.code, persistent=False)
        self.register_buffer("offset", state.offset, persistent=False)
        self.register_buffer("nested_absmax", state.state2.absmax, persistent=False)
        self.register_buffer("nested_code", state.state2.code, persistent=False)

    def _apply(self, fn, recurse=True):
        """Moves between devices only: Float16Module's .bfloat16() would round the fp32 statistics."""
        for name, buffer in self._buffers.items():
            moved = fn(buffer)
            self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self

    def quant_state(self):
        """bitsandbytes' QuantState of the tensor."""
        from bitsandbytes.functional import QuantState

        nested = QuantState(
            absmax=self.nested_absmax,
            code=self.nested_code,
            blocksize=self.nested_blocksize,
            dtype=torch.float32,
        )
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=nested,
        )

    def dequantize(self, packed: torch.Tensor) -> torch.Tensor:
        """The tensor as bitsandbytes gives it back, in the dtype it was quantized from."""
        return _functional().dequantize_4bit(packed, self.quant_state())

    def nbytes(self) -> int:
        """Bytes the statistics take (the packed codes are the caller's)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, nf4 with double quantization"


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, NF4Statistics]:
    """(packed 4-bit codes, statistics) of `weight`, by bitsandbytes' quantize_4bit."""
    packed, state = _functional().quantize_4bit(
        weight.detach().contiguous(), quant_type="nf4", blocksize=BLOCK, compress_statistics=True
    )
    return packed, NF4Statistics(state, tuple(weight.shape), weight.dtype)


class _FrozenNF4Linear(torch.autograd.Function):
    """x W^T (+ b) with W dequantized in forward and again in backward; no weight gradient."""

    @staticmethod
    def forward(ctx, input, packed, statistics: NF4Statistics, bias, allreduce_dgrad, tp_group):
        ctx.save_for_backward(packed)
        ctx.statistics, ctx.allreduce_dgrad, ctx.tp_group = statistics, allreduce_dgrad, tp_group
        output = torch.matmul(input, statistics.dequantize(packed).t())
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output):
        (packed,) = ctx.saved_tensors
        grad_input = grad_output.matmul(ctx.statistics.dequantize(packed))
        if ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=ctx.tp_group)
        return grad_input, None, None, None, None, None


def nf4_linear(
    input,
    packed,
    statistics: NF4Statistics,
    bias,
    gradient_accumulation_fusion,
    allreduce_dgrad,
    sequence_parallel,
    tp_group,
    grad_output_buffer=None,
    wgrad_deferral_limit=None,
):
    """megatron's linear_with_frozen_weight (tensor_parallel/layers.py), same arguments, over an NF4 weight."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(
            input, tensor_parallel_output_grad=True, group=tp_group
        )
    return _FrozenNF4Linear.apply(input, packed, statistics, bias, allreduce_dgrad, tp_group)

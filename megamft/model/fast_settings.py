"""The fused kernels and overlaps Megatron-LM users expect, each on where it can run here.

Every entry is a ``TransformerConfig`` field that megatron-core leaves off by
default. `fast_settings` decides each one for this run (the machine's CUDA,
Transformer Engine and apex as megatron-core sees them, the attention backend,
the layout, LoRA) and says why; a value the user gives in the ``transformer:``
section always wins. `megamft check` prints the decisions, training logs them.
None of them changes what is computed beyond floating-point rounding.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from megamft.config import MegamftConfig
from megamft.model.rope import is_yarn


@dataclass(frozen=True)
class Machine:
    """What the fast settings depend on, as megatron-core itself decides it."""

    cuda: bool
    transformer_engine: bool
    backend: str  # the attention backend: te, torch or local
    grad_accumulation_kernel: bool = False  # apex's fused_weight_gradient_mlp_cuda imports
    fused_moe_permute: bool = (
        False  # TE's fused token permutation (megatron's moe_utils.fused_permute)
    )


@dataclass(frozen=True)
class FastSetting:
    field: str
    on: bool
    why: str
    chosen_by_user: bool = False

    def describe(self) -> str:
        state = "on " if self.on else "off"
        return f"{state} {self.field}: {self.why}"


def machine_for(cuda: bool, transformer_engine: bool, backend: str) -> Machine:
    """Probe the optional kernels the way megatron-core imports them."""
    grad_kernel = cuda and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    permute = False
    if cuda and transformer_engine:
        from megatron.core.transformer.moe import moe_utils

        permute = getattr(moe_utils, "fused_permute", None) is not None
    return Machine(cuda, transformer_engine, backend, grad_kernel, permute)


def _gradient_accumulation_fusion(cfg: MegamftConfig, machine: Machine) -> tuple[bool, str]:
    if cfg.lora.enabled:
        return False, "LoRA freezes the base weights: no weight gradients to accumulate"
    if not machine.grad_accumulation_kernel:
        return False, (
            "needs apex's fused_weight_gradient_mlp_cuda extension (megatron's own linears, the output "
            "layer included, refuse it without)"
        )
    return True, "weight gradients accumulate into fp32 main_grad inside the GEMM"


def _bias_activation_fusion(cfg: MegamftConfig, machine: Machine) -> tuple[bool, str]:
    if cfg.model.mlp_activation != "swiglu":
        # megatron's fused GELU and GEGLU kernels compute GELU's tanh approximation whatever activation_func is
        return (
            False,
            f"megamft fuses SwiGLU only, not model.mlp_activation={cfg.model.mlp_activation}",
        )
    return True, "SwiGLU (and its bias) in one kernel"


def _bias_dropout_fusion(cfg: MegamftConfig, machine: Machine) -> tuple[bool, str]:
    return True, "bias, dropout and residual add in one kernel"


def _apply_rope_fusion(cfg: MegamftConfig, machine: Machine) -> tuple[bool, str]:
    if machine.backend != "te":
        return False, "Transformer Engine's fused RoPE serves the te attention backend"
    if cfg.model.multi_latent_attention and not is_yarn(cfg.model):
        return False, "megatron-core fuses multi-latent attention's RoPE for YaRN only"
    if is_yarn(cfg.model) and not cfg.model.multi_latent_attention:
        # megatron-core's apply_rotary_pos_emb drops YaRN's attention factor (mscale) in the fused thd kernel
        return False, "YaRN's attention factor is applied by megatron's unfused RoPE only"
    return (
        True,
        "TE's fused RoPE; for packed rows (thd) it avoids megatron's per-layer host read of the boundaries",
    )


def _moe_grouped_gemm(cfg: MegamftConfig, machine: Machine) -> tuple[bool, str]:
    if not cfg.model.num_experts:
        return False, "a dense model"
    if machine.backend != "te":
        return (
            False,
            "TE's grouped GEMM serves the te backend (the local spec runs one MLP per expert)",
        )
    return True, "all local experts in one grouped GEMM"


def _moe_permute_fusion(cfg: MegamftConfig, machine: Machine) -> tuple[bool, str]:
    if not cfg.model.num_experts:
        return False, "a dense model"
    if not machine.fused_moe_permute:
        return False, "needs Transformer Engine >= 2.1's fused token permutation"
    return True, "token permutation for the experts fused"


def _tp_comm_overlap(cfg: MegamftConfig, machine: Machine) -> tuple[bool, str]:
    p = cfg.parallel
    if machine.backend != "te":
        return False, "needs Transformer Engine's linears (userbuffers)"
    if p.tensor_model_parallel_size < 2 or not p.sequence_parallel:
        return False, "needs tensor parallelism with sequence parallel"
    if cfg.data.mode == "dynamic":
        return (
            False,
            "needs one sequence length for every micro-batch (data.mode=dynamic varies it)",
        )
    if cfg.train.precision == "fp32":
        return False, "runs in bf16/fp16"
    return True, "TP all-gathers and reduce-scatters overlapped with the GEMMs"


_RULES = {
    "gradient_accumulation_fusion": _gradient_accumulation_fusion,
    "bias_activation_fusion": _bias_activation_fusion,
    "bias_dropout_fusion": _bias_dropout_fusion,
    "apply_rope_fusion": _apply_rope_fusion,
    "moe_grouped_gemm": _moe_grouped_gemm,
    "moe_permute_fusion": _moe_permute_fusion,
    "tp_comm_overlap": _tp_comm_overlap,
}
FIELDS = tuple(_RULES)


def fast_settings(cfg: MegamftConfig, machine: Machine) -> list[FastSetting]:
    """Each fast setting on or off for this run, with the reason (the user's `transformer:` value wins)."""
    settings = []
    for field, rule in _RULES.items():
        if field in cfg.transformer:
            settings.append(
                FastSetting(
                    field, bool(cfg.transformer[field]), "set in the transformer section", True
                )
            )
        elif not machine.cuda:
            settings.append(FastSetting(field, False, "needs CUDA"))
        else:
            settings.append(FastSetting(field, *rule(cfg, machine)))
    return settings


def transformer_fields(settings: list[FastSetting]) -> dict[str, bool]:
    """The TransformerConfig fields megamft sets (the user's own stay in the transformer section)."""
    return {s.field: s.on for s in settings if not s.chosen_by_user}

"""Mixture-of-experts models on megatron-core's MoE layer.

Two jobs: the TransformerConfig fields of an MoE model, and how the MoE
families' Hugging Face config keys map onto megamft's model section.

Routing, as transformers computes it and as megatron is told to:
- Mixtral, and Qwen with ``norm_topk_prob: true``: softmax over all experts,
  keep the top k, renormalise them to sum to 1. That equals a softmax over the
  top-k logits, megatron's ``moe_router_pre_softmax=False``.
- Qwen with ``norm_topk_prob: false``: softmax over all experts, keep the top k
  as they are: megatron's ``moe_router_pre_softmax=True``.
- Qwen3-MoE (Qwen3-Coder-30B-A3B): Qwen2-MoE's routing without a shared expert.
- Qwen2-MoE's shared expert (every token) is scaled by ``sigmoid(x . w)``:
  megatron's ``moe_shared_expert_gate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamft.config import ModelConfig, ParallelConfig
from megamft.errors import UserError

# Model fields that weigh training losses only: a checkpoint loads whatever they were.
ROUTER_LOSS_FIELDS = ("moe_aux_loss_coeff", "moe_z_loss_coeff")


class UnsupportedMoE(UserError, ValueError):
    """An MoE Hugging Face config megamft cannot represent; the message says why."""


def moe_transformer_fields(model: ModelConfig, parallel: ParallelConfig) -> dict:
    """TransformerConfig fields of an MoE model (none for a dense one)."""
    if model.num_experts is None:
        return {}
    return dict(
        num_moe_experts=model.num_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        # Routing in fp32 whatever the training precision, as transformers does: in bf16
        # the top-k choice of near-tied experts would flip.
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_z_loss_coeff=model.moe_z_loss_coeff or None,
        # all-to-all exchanges only the routed tokens between EP ranks (allgather sends all).
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )


@dataclass(frozen=True)
class MoeFamily:
    """How one MoE family's config.json names its expert settings."""

    experts_keys: tuple[str, ...]
    """Keys that may hold the number of routed experts (first present wins)."""
    expert_size_key: str
    """Key of one routed expert's inner width."""
    always_normalizes_topk: bool
    """Mixtral renormalises the top-k weights unconditionally; Qwen only with norm_topk_prob."""
    shared_expert: bool = False
    """A gated shared expert in every MoE layer (Qwen2-MoE)."""

    def model_fields(self, hf: dict, source: str) -> dict:
        """Extra megamft model fields for this config.json."""
        experts = next((hf[k] for k in self.experts_keys if hf.get(k)), None)
        if not experts:
            raise UnsupportedMoE(f"{source}: none of {list(self.experts_keys)} gives the number of experts")
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedMoE(f"{source}: dense layers between MoE layers (mlp_only_layers, decoder_sparse_step "
                                 "!= 1) are not supported; every layer must be an MoE layer")
        if hf.get("router_jitter_noise"):
            raise UnsupportedMoE(f"{source}: router_jitter_noise is not supported (megatron's jitter differs)")
        normalize = self.always_normalizes_topk or bool(hf.get("norm_topk_prob", False))
        fields = dict(
            num_experts=int(experts),
            moe_ffn_hidden_size=int(hf[self.expert_size_key]),
            moe_router_topk=int(hf.get("num_experts_per_tok", 2)),
            moe_router_pre_softmax=not normalize,
        )
        if self.shared_expert:
            fields.update(moe_shared_expert_intermediate_size=int(hf["shared_expert_intermediate_size"]),
                          moe_shared_expert_gate=True)
        return fields

    def hf_fields(self, model: ModelConfig) -> dict:
        """config.json keys that transformers reads for this model's experts."""
        fields = {key: model.num_experts for key in self.experts_keys}
        fields.update({
            self.expert_size_key: model.moe_ffn_hidden_size or model.ffn_hidden_size,
            "num_experts_per_tok": model.moe_router_topk,
            "output_router_logits": False,
            "router_aux_loss_coef": model.moe_aux_loss_coeff,
        })
        if not self.always_normalizes_topk:
            fields.update(norm_topk_prob=not model.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=[])
        if self.shared_expert:
            fields["shared_expert_intermediate_size"] = model.moe_shared_expert_intermediate_size
        return fields


MIXTRAL = MoeFamily(("num_local_experts",), "intermediate_size", always_normalizes_topk=True)
QWEN2_MOE = MoeFamily(("num_experts",), "moe_intermediate_size", always_normalizes_topk=False, shared_expert=True)
# Published Qwen3-MoE configs say num_experts; transformers 5 aliases it and saves num_local_experts.
QWEN3_MOE = MoeFamily(("num_experts", "num_local_experts"), "moe_intermediate_size", always_normalizes_topk=False)

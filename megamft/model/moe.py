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
- DeepSeek-V2 (transformers' DeepseekV2TopkRouter): softmax over all experts,
  top k, no renormalisation, weights times ``routed_scaling_factor``
  (megatron's ``moe_router_topk_scaling_factor``); ``n_shared_experts``
  ungated shared experts, one MLP of n x the expert width; the first
  ``first_k_dense_replace`` layers dense. Its ``group_limited_greedy`` ranks
  groups by their best expert, megatron by the sum of their top topk /
  topk_group experts: the same only when that is one expert, so other
  settings are refused.
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
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_num_groups=model.moe_router_num_groups,
        moe_router_group_topk=model.moe_router_group_topk,
        moe_layer_freq=moe_layer_pattern(model),
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


def moe_layer_pattern(model: ModelConfig) -> int | list[int]:
    """megatron's moe_layer_freq: 1 (every layer MoE), or 0 for each of the first dense layers then 1."""
    if not model.moe_first_dense_layers:
        return 1
    dense = model.moe_first_dense_layers
    return [0] * dense + [1] * (model.num_layers - dense)


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
    never_normalizes_topk: bool = False
    """transformers' router never renormalises (DeepSeek-V2), whatever norm_topk_prob says: true is refused."""
    shared_experts_key: str | None = None
    """Key counting ungated shared experts, run as one MLP of that many expert widths (DeepSeek's
    n_shared_experts)."""
    first_dense_key: str | None = None
    """Key counting the dense layers before the MoE ones (DeepSeek's first_k_dense_replace)."""
    scaling_key: str | None = None
    """Key of the factor the chosen experts' weights are multiplied by (DeepSeek's routed_scaling_factor)."""
    group_keys: tuple[str, str, str] | None = None
    """(method, groups, groups chosen) keys of group-limited routing (DeepSeek's topk_method, n_group,
    topk_group)."""

    def model_fields(self, hf: dict, source: str) -> dict:
        """Extra megamft model fields for this config.json."""
        experts = next((hf[k] for k in self.experts_keys if hf.get(k)), None)
        if not experts:
            raise UnsupportedMoE(
                f"{source}: none of {list(self.experts_keys)} gives the number of experts"
            )
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedMoE(
                f"{source}: dense layers between MoE layers (mlp_only_layers, decoder_sparse_step "
                "!= 1) are not supported; every layer must be an MoE layer"
            )
        if hf.get("router_jitter_noise"):
            raise UnsupportedMoE(
                f"{source}: router_jitter_noise is not supported (megatron's jitter differs)"
            )
        if self.never_normalizes_topk and hf.get("norm_topk_prob"):
            raise UnsupportedMoE(
                f"{source}: norm_topk_prob true: transformers' router for this family ignores "
                "it (DeepSeek's own code renormalises); set it false to train what transformers runs"
            )
        normalize = self.always_normalizes_topk or bool(hf.get("norm_topk_prob", False))
        fields = dict(
            num_experts=int(experts),
            moe_ffn_hidden_size=int(hf[self.expert_size_key]),
            moe_router_topk=int(hf.get("num_experts_per_tok") or 2),
            moe_router_pre_softmax=not normalize,
        )
        if self.shared_expert:
            fields.update(
                moe_shared_expert_intermediate_size=int(hf["shared_expert_intermediate_size"]),
                moe_shared_expert_gate=True,
            )
        if self.shared_experts_key and hf.get(self.shared_experts_key):
            fields["moe_shared_expert_intermediate_size"] = int(hf[self.shared_experts_key]) * int(
                hf[self.expert_size_key]
            )
        fields.update(self._layer_and_routing_fields(hf, fields["moe_router_topk"], source))
        return fields

    def _layer_and_routing_fields(self, hf: dict, topk: int, source: str) -> dict:
        fields = {}
        if self.first_dense_key and hf.get(self.first_dense_key):
            dense = int(hf[self.first_dense_key])
            if dense >= hf["num_hidden_layers"]:
                raise UnsupportedMoE(
                    f"{source}: {self.first_dense_key}={dense} leaves no MoE layer"
                )
            fields["moe_first_dense_layers"] = dense
        if self.scaling_key and hf.get(self.scaling_key, 1.0) != 1.0:
            fields["moe_router_topk_scaling_factor"] = float(hf[self.scaling_key])
        if self.group_keys:
            method_key, groups_key, chosen_key = self.group_keys
            method = hf.get(method_key) or "greedy"
            if method == "group_limited_greedy":
                groups, chosen = hf.get(groups_key), hf.get(chosen_key)
                if not groups or not chosen or topk // chosen != 1:
                    raise UnsupportedMoE(
                        f"{source}: {method_key}=group_limited_greedy with {groups_key}={groups}, "
                        f"{chosen_key}={chosen}, num_experts_per_tok={topk}: transformers ranks groups by their "
                        f"best expert, megatron-core by the sum of their top num_experts_per_tok // {chosen_key} "
                        "experts; they agree only when that is 1"
                    )
                fields.update(moe_router_num_groups=int(groups), moe_router_group_topk=int(chosen))
            elif method != "greedy":
                raise UnsupportedMoE(
                    f"{source}: {method_key}={method!r} is not supported "
                    "(greedy, group_limited_greedy)"
                )
        return fields

    def hf_fields(self, model: ModelConfig) -> dict:
        """config.json keys that transformers reads for this model's experts."""
        fields = {key: model.num_experts for key in self.experts_keys}
        fields.update(
            {
                self.expert_size_key: model.moe_ffn_hidden_size or model.ffn_hidden_size,
                "num_experts_per_tok": model.moe_router_topk,
                "output_router_logits": False,
                "router_aux_loss_coef": model.moe_aux_loss_coeff,
            }
        )
        if not self.always_normalizes_topk:
            fields.update(
                norm_topk_prob=not model.moe_router_pre_softmax,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        if self.shared_expert:
            fields["shared_expert_intermediate_size"] = model.moe_shared_expert_intermediate_size
        if self.shared_experts_key:
            expert = model.moe_ffn_hidden_size or model.ffn_hidden_size
            fields[self.shared_experts_key] = (
                model.moe_shared_expert_intermediate_size or 0
            ) // expert
        if self.first_dense_key:
            fields[self.first_dense_key] = model.moe_first_dense_layers
        if self.scaling_key:
            fields[self.scaling_key] = model.moe_router_topk_scaling_factor or 1.0
        if self.group_keys:
            method_key, groups_key, chosen_key = self.group_keys
            grouped = bool(model.moe_router_group_topk)
            fields.update(
                {
                    method_key: "group_limited_greedy" if grouped else "greedy",
                    groups_key: model.moe_router_num_groups,
                    chosen_key: model.moe_router_group_topk,
                }
            )
        return fields


MIXTRAL = MoeFamily(("num_local_experts",), "intermediate_size", always_normalizes_topk=True)
QWEN2_MOE = MoeFamily(
    ("num_experts",), "moe_intermediate_size", always_normalizes_topk=False, shared_expert=True
)
# Published Qwen3-MoE configs say num_experts; transformers 5 aliases it and saves num_local_experts.
QWEN3_MOE = MoeFamily(
    ("num_experts", "num_local_experts"), "moe_intermediate_size", always_normalizes_topk=False
)
# DeepSeek-V2, V2-Lite, DeepSeek-Coder-V2(-Lite): softmax then top k, never renormalised, scaled; dense first layers.
DEEPSEEK_V2 = MoeFamily(
    ("n_routed_experts",),
    "moe_intermediate_size",
    always_normalizes_topk=False,
    never_normalizes_topk=True,
    shared_experts_key="n_shared_experts",
    first_dense_key="first_k_dense_replace",
    scaling_key="routed_scaling_factor",
    group_keys=("topk_method", "n_group", "topk_group"),
)

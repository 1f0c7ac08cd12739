"""LoRA on Transformer Engine's layer with its norms apart, against stand-ins for TE's modules (te_standins).

TE needs CUDA: the GPU check (benchmarks/gpu_checks, lora_te) runs the real modules where TE imports.
Here the spec is checked for what it builds, and a layer built from it over stand-ins that follow the
contracts of megatron's TE wrappers (megatron/core/extensions/transformer_engine.py) must compute what the
local LoRA layer computes, with the same checkpoint keys.
"""

import lora_jobs
import pytest
import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from te_standins import STAND_INS, TEColumnParallelLinear, TEDotProductAttention, TENorm

from megamft.config import LoraConfig
from megamft.model.lora import _LoraLinear
from megamft.model.lora_spec import te_separate_norm_layer_spec
from megamft.testing.distributed import launch

LORA = LoraConfig(enabled=True, rank=4, targets=["all-linear"])


def _module(spec):
    return spec.module if isinstance(spec, ModuleSpec) else spec


def test_the_te_lora_spec_keeps_te_modules_with_separate_norms():
    layer = te_separate_norm_layer_spec(LORA, gated=True, te=STAND_INS).submodules
    assert layer.input_layernorm is TENorm and layer.pre_mlp_layernorm is TENorm
    attention = layer.self_attention.submodules
    assert attention.core_attention is TEDotProductAttention
    for owner, name, base in (
        (attention, "linear_qkv", TEColumnParallelLinear),
        (attention, "linear_proj", None),
        (layer.mlp.submodules, "linear_fc1", TEColumnParallelLinear),
        (layer.mlp.submodules, "linear_fc2", None),
    ):
        spec = getattr(owner, name)
        assert issubclass(spec.module, _LoraLinear) and issubclass(
            spec.module, base or STAND_INS.row_linear
        ), name
        assert spec.params["lora"] is LORA
    assert (
        layer.mlp.submodules.linear_fc1.params["gated"]
        and not layer.mlp.submodules.linear_fc2.params["gated"]
    )
    # the norms' weights keep the keys of TE's fused layer and of the local spec
    assert layer.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }


def test_only_adapted_linears_get_the_lora_class():
    only_attention = LoraConfig(enabled=True, rank=4, targets=["linear_qkv"])
    layer = te_separate_norm_layer_spec(only_attention, gated=True, te=STAND_INS).submodules
    assert issubclass(_module(layer.self_attention.submodules.linear_qkv), _LoraLinear)
    assert layer.self_attention.submodules.linear_proj is STAND_INS.row_linear
    assert layer.mlp.submodules.linear_fc1 is TEColumnParallelLinear


def test_moe_experts_use_te_linears_when_adapted():
    from megatron.core.transformer.moe.experts import SequentialMLP

    layer = te_separate_norm_layer_spec(LORA, gated=True, num_experts=4, te=STAND_INS).submodules
    experts = layer.mlp.submodules.experts
    assert experts.module is SequentialMLP
    assert issubclass(experts.submodules.linear_fc1.module, TEColumnParallelLinear)
    assert issubclass(experts.submodules.linear_fc1.module, _LoraLinear)


def test_qlora_refuses_transformer_engine():
    with pytest.raises(ValueError, match="local linears"):
        te_separate_norm_layer_spec(
            LoraConfig(enabled=True, quantize_base="nf4"), gated=True, te=STAND_INS
        )


def test_a_linear_that_owns_its_norm_is_refused():
    """TE's LayerNormLinear reads the un-normalized input: an adapter there would be wrong (refused at build)."""
    launch(lora_jobs.build_norm_owning_lora_linear, 1, timeout=120)


@pytest.mark.parametrize(
    "overrides",
    [(), ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")],
    ids=["tp1", "tp2-sp"],
)
def test_te_lora_layer_computes_what_the_local_lora_layer_computes(overrides):
    world = 2 if overrides else 1
    out = launch(
        lora_jobs.te_spec_layer_against_local, world, timeout=180, kwargs={"overrides": overrides}
    )[0]
    te_out, local_out = out["outputs"]
    torch.testing.assert_close(te_out, local_out, rtol=0, atol=0)
    te_grads, local_grads = out["grads"]
    assert te_grads.keys() == local_grads.keys() and len(te_grads) == 8
    for name in te_grads:
        torch.testing.assert_close(te_grads[name], local_grads[name], rtol=0, atol=0)
    te_keys, local_keys = out["keys"]
    assert te_keys == local_keys  # checkpoints move between the backends
    assert out["types"]["self_attention.linear_qkv"] == "LoraTEColumnParallelLinear"
    assert (
        out["types"]["input_layernorm"] == "MegamftRMSNorm"
    )  # TENorm's stand-in: a separate norm module

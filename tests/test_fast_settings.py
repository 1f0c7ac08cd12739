"""The fast settings: decided per machine with a reason, the user's value wins, and they compute the same run.

megatron-core leaves its fusions and overlaps off by default; megamft turns each on where its kernel can
run (megamft/model/fast_settings.py). On this CPU machine every one is off ("needs CUDA"); the ones whose
kernels are plain torch (bias/activation and bias/dropout fusion) also run here when a user asks for them,
and must leave the training run unchanged.
"""

import sys
import types

import jobs
import precision_jobs
import pytest

from megamft.config import load_config
from megamft.model.fast_settings import FIELDS, Machine, fast_settings, transformer_fields
from megamft.model.userbuffers import initialize_userbuffers, userbuffer_shape
from megamft.testing.distributed import launch

CLUSTER = "examples/cluster/codellama-34b_32xh100.yaml"
H100_WITH_TE = Machine(
    cuda=True,
    transformer_engine=True,
    backend="te",
    grad_accumulation_kernel=True,
    fused_moe_permute=True,
)


def _decisions(cfg, machine):
    return {s.field: s for s in fast_settings(cfg, machine)}


def test_every_setting_is_off_without_cuda_and_says_so():
    decided = _decisions(
        load_config(CLUSTER), Machine(cuda=False, transformer_engine=False, backend="torch")
    )
    assert set(decided) == set(FIELDS)
    assert all(not s.on and s.why == "needs CUDA" for s in decided.values())


def test_on_a_te_machine_the_dense_cluster_example_gets_every_dense_setting():
    decided = _decisions(load_config(CLUSTER), H100_WITH_TE)
    dense = {
        "gradient_accumulation_fusion",
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "apply_rope_fusion",
        "tp_comm_overlap",
    }
    assert {f for f, s in decided.items() if s.on} == dense
    assert decided["moe_grouped_gemm"].why == "a dense model"


@pytest.mark.parametrize(
    "override,field,reason",
    [
        ("lora.enabled=true", "gradient_accumulation_fusion", "LoRA freezes the base weights"),
        (
            "model.mlp_activation=gelu_tanh",
            "bias_activation_fusion",
            "not model.mlp_activation=gelu_tanh",
        ),
        ("data.mode=dynamic", "tp_comm_overlap", "one sequence length"),
        ("parallel.sequence_parallel=false", "tp_comm_overlap", "sequence parallel"),
    ],
)
def test_a_setting_that_cannot_run_is_off_with_its_reason(override, field, reason):
    decided = _decisions(load_config(CLUSTER, [override]), H100_WITH_TE)
    assert not decided[field].on and reason in decided[field].why


def test_without_transformer_engine_its_settings_are_off():
    decided = _decisions(
        load_config(CLUSTER), Machine(cuda=True, transformer_engine=False, backend="torch")
    )
    assert not decided["apply_rope_fusion"].on and not decided["tp_comm_overlap"].on
    assert (
        not decided["gradient_accumulation_fusion"].on
        and "fused_weight_gradient_mlp_cuda" in decided["gradient_accumulation_fusion"].why
    )
    assert decided["bias_activation_fusion"].on  # plain torch: needs only CUDA


def test_the_users_value_wins_and_is_left_to_the_transformer_section():
    cfg = load_config(CLUSTER, ["transformer.tp_comm_overlap=false"])
    settings = fast_settings(cfg, H100_WITH_TE)
    chosen = next(s for s in settings if s.field == "tp_comm_overlap")
    assert chosen.chosen_by_user and not chosen.on
    assert "tp_comm_overlap" not in transformer_fields(settings)


def test_userbuffers_get_the_layer_input_shape_once(monkeypatch):
    """Stand-in following TE's transformer_engine/pytorch/module/base.py ``initialize_ub``: keyword
    arguments (shape, tp_size, use_fp8, quantization_modes, dtype, ub_cfgs, bootstrap_backend), and
    an assertion that it is initialized only once per process."""
    calls = []

    def initialize_ub(
        shape,
        tp_size,
        use_fp8=False,
        quantization_modes=None,
        dtype=None,
        ub_cfgs=None,
        bootstrap_backend=None,
    ):
        assert not calls, "UB communicators are already initialized."
        calls.append({"shape": shape, "tp_size": tp_size, "bootstrap_backend": bootstrap_backend})

    base = types.ModuleType("transformer_engine.pytorch.module.base")
    base.initialize_ub = initialize_ub
    for name in (
        "transformer_engine",
        "transformer_engine.pytorch",
        "transformer_engine.pytorch.module",
    ):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.module.base", base)
    cfg = load_config(CLUSTER, ["parallel.context_parallel_size=2", "data.mode=pad"])
    on = types.SimpleNamespace(tp_comm_overlap=True, fp8=None, params_dtype="bf16")
    assert initialize_userbuffers(cfg, on)
    assert calls == [{"shape": [4096 * 1 // 2, 8192], "tp_size": 4, "bootstrap_backend": "nccl"}]
    assert userbuffer_shape(cfg) == [2048, 8192]
    assert not initialize_userbuffers(cfg, types.SimpleNamespace(tp_comm_overlap=False))
    assert len(calls) == 1


def test_the_plain_torch_fusions_leave_the_run_unchanged(initial_weights):
    common = (
        "train.train_steps=2",
        f"checkpoint.load_dir={initial_weights}",
        "checkpoint.load_optimizer=false",
        "parallel.tensor_model_parallel_size=2",
    )
    plain = launch(jobs.train, 2, kwargs={"overrides": common})[0]
    fused = launch(
        jobs.train,
        2,
        kwargs={
            "overrides": common
            + ("transformer.bias_activation_fusion=true", "transformer.bias_dropout_fusion=true")
        },
    )[0]
    assert plain["loss"] == pytest.approx(fused["loss"], rel=1e-6)
    assert plain["grad_norm"] == pytest.approx(fused["grad_norm"], rel=1e-6)


def test_garbage_is_collected_every_interval_and_never_automatically():
    got = launch(
        precision_jobs.garbage_collections,
        1,
        kwargs={"overrides": ("train.train_steps=4", "train.gc_interval=2")},
    )[0]
    assert got["collections"] == [2, 2], (
        got
    )  # full collections after steps 2 and 4, nothing in between
    automatic = launch(
        precision_jobs.garbage_collections,
        1,
        kwargs={"overrides": ("train.train_steps=4", "train.gc_interval=0")},
    )[0]
    assert (
        automatic["collections"] and 0 in automatic["collections"]
    )  # Python's own, at its thresholds

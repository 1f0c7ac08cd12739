"""TP-aware LoRA: merged equals adapters, TP=2 equals TP=1, only adapters train, export merges."""

import jobs
import pytest
import torch

from megamft.testing.distributed import launch

LORA = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8")


@pytest.mark.parametrize(
    "world_size,layout",
    [
        (1, ()),
        (2, ("parallel.tensor_model_parallel_size=2",)),
        (2, ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")),
    ],
)
def test_adapters_train_alone_and_merge_exactly(initial_weights, world_size, layout):
    out = launch(
        jobs.lora_checks,
        world_size,
        timeout=240,
        kwargs={"overrides": layout, "weights_dir": initial_weights},
    )[0]
    assert out["trainable"] and all(".lora_" in n for n in out["trainable"])
    assert out["changed"] and all(".lora_" in n for n in out["changed"])  # the base stayed frozen
    assert out["optimizer_params"] == out["adapter_params"]
    torch.testing.assert_close(out["merged"], out["with_adapters"], rtol=1e-5, atol=1e-5)


def test_lora_at_tp2_matches_tp1(initial_weights):
    common = LORA + (
        "train.train_steps=3",
        f"checkpoint.load_dir={initial_weights}",
        "checkpoint.load_optimizer=false",
    )
    one = launch(jobs.train, 1, timeout=240, kwargs={"overrides": common})[0]
    two = launch(
        jobs.train,
        2,
        timeout=240,
        kwargs={"overrides": common + ("parallel.tensor_model_parallel_size=2",)},
    )[0]
    assert one["loss"][2] != one["loss"][0]
    for a, b in zip(one["loss"] + one["grad_norm"], two["loss"] + two["grad_norm"]):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)


def test_adapter_only_checkpoints_resume_exactly_and_export_merged(initial_weights, tmp_path):
    """Adapter-only saves hold adapters and their optimizer state; resume and export read the base."""
    from safetensors.torch import load_file

    from megamft.checkpoint import hf_convert
    from megamft.checkpoint.global_view import tensor_index
    from megamft.checkpoint.layout import iteration_dir

    common = LORA + (
        "train.train_steps=3",
        "checkpoint.save_interval=1",
        "parallel.tensor_model_parallel_size=2",
        f"checkpoint.load_dir={initial_weights}",
        "checkpoint.load_optimizer=false",
        "checkpoint.optimizer_format=reshardable",
    )  # resumed below at TP=1
    full = launch(
        jobs.train,
        2,
        timeout=240,
        kwargs={"overrides": common + (f"checkpoint.save_dir={tmp_path / 'full'}",)},
    )[0]
    adapters = launch(
        jobs.train,
        2,
        timeout=240,
        kwargs={
            "overrides": common
            + (f"checkpoint.save_dir={tmp_path / 'adapters'}", "lora.save_adapters_only=true")
        },
    )[0]
    assert adapters["loss"] == full["loss"]

    def weights(name):
        return [
            k
            for k in tensor_index(iteration_dir(tmp_path / name, 3))
            if not k.startswith("optimizer.")
        ]

    assert weights("adapters") and all(".lora_" in k for k in weights("adapters")), weights(
        "adapters"
    )[:5]
    assert any(".lora_" not in k for k in weights("full"))  # the full checkpoint has the base too

    def numel(name):
        index = tensor_index(iteration_dir(tmp_path / name, 3))
        return sum(torch.Size(index[k].size).numel() for k in weights(name))

    assert numel("adapters") < 0.3 * numel("full")

    resumed = launch(
        jobs.train,
        1,
        timeout=240,
        kwargs={
            "overrides": LORA
            + (
                "train.train_steps=3",
                f"checkpoint.load_dir={tmp_path / 'adapters'}",
                "checkpoint.load_iteration=1",
                "checkpoint.resume=never",
            )
        },
    )[0]
    for got, want in zip(
        resumed["loss"] + resumed["grad_norm"], full["loss"][1:] + full["grad_norm"][1:]
    ):
        assert abs(got - want) <= 1e-5 * abs(want), (resumed, full)

    exported = [
        hf_convert.megatron_to_hf(iteration_dir(tmp_path / name, 3), tmp_path / f"hf_{name}")
        for name in ("full", "adapters")
    ]
    full_tensors, adapter_tensors = (
        {k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        for p in exported
    )
    assert full_tensors
    assert full_tensors.keys() == adapter_tensors.keys()
    for name, tensor in full_tensors.items():
        assert torch.equal(tensor, adapter_tensors[name]), name


def test_lora_builds_on_transformer_engine_except_for_qlora():
    from megamft.model.spec import resolve_attention_backend

    assert resolve_attention_backend("auto", te_installed=True, quantized_base=False) == "te"
    assert resolve_attention_backend("auto", te_installed=True, quantized_base=True) == "torch"
    assert resolve_attention_backend("auto", te_installed=False) == "torch"
    assert resolve_attention_backend("te", te_installed=True) == "te"
    with pytest.raises(ValueError, match="NF4 base computes in megatron's local linears"):
        resolve_attention_backend("te", te_installed=True, quantized_base=True)
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        resolve_attention_backend("te", te_installed=False)


MOE_LORA_MODEL = (
    "model.num_layers=2",
    "model.num_experts=4",
    "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=32",
    "model.moe_shared_expert_intermediate_size=32",
    "optimizer.use_distributed_optimizer=false",
)


@pytest.mark.slow
def test_lora_on_experts_trains_at_ep2_as_one_process(tmp_path):
    """Adapters on routed experts (reduced over expert data-parallel ranks), shared experts and attention:
    EP=2 x DP=2 trains exactly as one process."""
    weights = str(tmp_path / "weights")
    launch(
        jobs.save_initial_weights,
        1,
        timeout=120,
        kwargs={"save_dir": weights, "overrides": MOE_LORA_MODEL},
    )
    common = (
        *MOE_LORA_MODEL,
        *LORA,
        "lora.targets=[all-linear]",
        "train.train_steps=3",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "data.seq_length=128",
        "data.max_samples_per_task=16",
        "data.valid_samples_per_task=4",
        f"checkpoint.load_dir={weights}",
        "checkpoint.load_optimizer=false",
    )
    one = launch(jobs.train, 1, timeout=300, kwargs={"overrides": common})[0]
    two = next(
        r
        for r in launch(
            jobs.train,
            2,
            timeout=300,
            kwargs={"overrides": common + ("parallel.expert_model_parallel_size=2",)},
        )
        if r["loss"]
    )
    assert one["loss"][2] != one["loss"][0]
    torch.testing.assert_close(
        torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(two["grad_norm"]), torch.tensor(one["grad_norm"]), rtol=1e-5, atol=0
    )

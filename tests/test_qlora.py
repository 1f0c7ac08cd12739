"""QLoRA: the frozen base linears held as bitsandbytes NF4 (double quantization), each TP rank its own shard.

References: bitsandbytes' own quantize_4bit / dequantize_4bit of the shard each rank holds (read from the
base checkpoint and split as megatron splits it); a plain LoRA run over the weights the ranks dequantized;
the model's own merge for the export.

What equality holds across layouts: NF4 quantizes blocks of 64 consecutive values and double-quantizes
their maxima in blocks of 256 around the mean of all of them. A rank quantizes its shard, so a TP=2 run
computes with other dequantized weights than a TP=1 run (the 4-bit codes agree where blocks do not straddle
a shard boundary, the double-quantized maxima do not), and a TP=2 QLoRA run equals exactly a TP=1 LoRA run
over the weights the TP=2 ranks dequantized.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes.functional")

import jobs  # noqa: E402
import lora_jobs  # noqa: E402

from megamft.checkpoint import global_view  # noqa: E402
from megamft.checkpoint.layout import iteration_dir  # noqa: E402
from megamft.testing.distributed import launch  # noqa: E402

QLORA = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.quantize_base=nf4")
TP2 = ("parallel.tensor_model_parallel_size=2",)


def _bnb_round_trip(shard: torch.Tensor) -> torch.Tensor:
    packed, state = bnb.quantize_4bit(
        shard.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    return bnb.dequantize_4bit(packed, state)


def _rank_shard(name: str, weight: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """The part of a layer's weight a TP rank holds, as megatron splits it (tensor_parallel/layers.py, mlp.py)."""
    if name.endswith(("linear_proj", "linear_fc2")):  # row-parallel: the input dimension
        return weight.chunk(tp, dim=1)[rank]
    if name.endswith("linear_fc1"):  # SwiGLU's [gate; up]: each rank holds [gate_r; up_r]
        gate, up = weight.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return weight.chunk(tp)[rank]  # column-parallel linear_qkv


def _base_weight(checkpoint, name: str) -> torch.Tensor:
    """One layer's weight from the base checkpoint ("1.linear_qkv": layer 1, global layer axis 0)."""
    layer, module = name.split(".", 1)
    owner = "self_attention" if module in ("linear_qkv", "linear_proj") else "mlp"
    key = f"decoder.layers.{owner}.{module}.weight"
    shape = tuple(global_view.tensor_index(checkpoint)[key].size)
    region = global_view.Region(key, (int(layer) - 1, 0, 0), (1, *shape[1:]))
    return global_view.read_regions(checkpoint, [region])[0][0]


def test_each_rank_holds_bitsandbytes_nf4_of_its_own_shard(initial_weights):
    base = iteration_dir(initial_weights, 0)
    results = launch(
        lora_jobs.quantized_shards,
        2,
        timeout=240,
        kwargs=dict(
            checkpoint=initial_weights,
            model_yaml=None,
            overrides=QLORA + TP2 + ("train.precision=bf16",),
        ),
    )
    assert len(results[0]["weights"]) == 16  # 4 layers x qkv, proj, fc1, fc2
    for out in results:
        for name, weight in out["weights"].items():
            shard = _rank_shard(name, _base_weight(base, name), out["tp_rank"], 2).to(
                torch.bfloat16
            )
            assert weight.dtype == torch.bfloat16
            assert torch.equal(weight, _bnb_round_trip(shard)), name
    # the whole tensor quantized at once is another quantization: what holds across layouts is per shard
    name = "1.linear_qkv"
    whole = _bnb_round_trip(_base_weight(base, name).to(torch.bfloat16))
    assert not torch.equal(torch.cat([out["weights"][name] for out in results]), whole)


QUICKSTART_MODEL = (
    "model.num_layers=4",
    "model.hidden_size=128",
    "model.ffn_hidden_size=352",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
)


def test_the_nf4_base_takes_about_half_a_byte_per_parameter_as_estimated():
    """Measured on the CPU for the quickstart's model: codes and statistics of every base linear, against
    the estimator's count."""
    from megamft.sizing.memory import quantized_base_bytes

    overrides = QLORA + QUICKSTART_MODEL + ("train.precision=bf16",)
    out = launch(
        lora_jobs.quantized_shards,
        1,
        timeout=240,
        kwargs=dict(checkpoint=None, model_yaml=None, overrides=overrides),
    )[0]
    per_parameter = out["base_bytes"] / out["base_params"]
    # 4 bits + an 8-bit maximum per 64 values + an fp32 maximum per 256 blocks: 0.516; plus 1.1 KB of code
    # tables per tensor, which small matrices feel (bf16 would be 2 bytes)
    assert 0.516 < per_parameter < 0.56, per_parameter
    params, nbytes = quantized_base_bytes(jobs.tiny_config(*overrides))
    assert (params, nbytes) == (out["base_params"], out["base_bytes"])


@pytest.mark.slow
def test_qlora_at_tp2_equals_lora_over_the_shards_it_dequantized(initial_weights, tmp_path):
    """fp32 for exactness (the NF4 path is the same in bf16): TP=2 QLoRA == TP=1 LoRA over the TP=2 ranks'
    dequantized weights, step for step; both learn."""
    fp32 = ("train.precision=fp32",)
    dequantized = tmp_path / "dequantized"
    launch(
        lora_jobs.save_weights,
        2,
        timeout=240,
        kwargs=dict(
            checkpoint=initial_weights,
            model_yaml=None,
            overrides=QLORA + TP2 + fp32,
            out_dir=str(dequantized),
        ),
    )
    common = (
        "lora.enabled=true",
        "lora.rank=4",
        "lora.alpha=8",
        "train.train_steps=3",
        "checkpoint.load_optimizer=false",
        *fp32,
    )
    qlora = launch(
        jobs.train,
        2,
        timeout=300,
        kwargs={
            "overrides": common
            + TP2
            + ("lora.quantize_base=nf4", f"checkpoint.load_dir={initial_weights}")
        },
    )[0]
    lora = launch(
        jobs.train,
        1,
        timeout=300,
        kwargs={"overrides": common + (f"checkpoint.load_dir={dequantized}",)},
    )[0]
    assert qlora["loss"][2] != qlora["loss"][0]
    torch.testing.assert_close(
        torch.tensor(qlora["loss"]), torch.tensor(lora["loss"]), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(qlora["grad_norm"]), torch.tensor(lora["grad_norm"]), rtol=1e-5, atol=0
    )


@pytest.mark.slow
def test_qlora_export_merges_what_the_ranks_computed_with(initial_weights, tmp_path):
    """The bf16 export of an adapter-only QLoRA run (TP=2) holds, bit for bit, each rank's dequantized NF4 shard
    plus its adapter, as the ranks merge them themselves (merge_lora) and save."""
    from safetensors.torch import load_file

    from megamft.checkpoint import hf_convert

    bf16 = ("train.precision=bf16",)
    run = tmp_path / "run"
    jobs_overrides = (
        QLORA
        + TP2
        + bf16
        + (
            "train.train_steps=2",
            "optimizer.lr=0.05",
            "lora.save_adapters_only=true",
            f"checkpoint.load_dir={initial_weights}",
            "checkpoint.load_optimizer=false",
            f"checkpoint.save_dir={run}",
        )
    )
    launch(jobs.train, 2, timeout=300, kwargs={"overrides": jobs_overrides})
    merged = tmp_path / "merged"
    launch(
        lora_jobs.save_weights,
        2,
        timeout=240,
        kwargs=dict(
            checkpoint=str(run),
            model_yaml=None,
            overrides=QLORA + TP2 + bf16,
            out_dir=str(merged),
            merge=True,
        ),
    )
    ours, theirs = (
        hf_convert.megatron_to_hf(src, tmp_path / f"hf_{i}", dtype=torch.bfloat16)
        for i, src in enumerate((run, merged))
    )
    exported = [
        {k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        for p in (ours, theirs)
    ]
    assert exported[0].keys() == exported[1].keys()
    for key, tensor in exported[1].items():
        assert torch.equal(exported[0][key], tensor), key
    b = global_view.read_regions(
        iteration_dir(run, 2),
        [
            global_view.Region(
                "decoder.layers.self_attention.linear_qkv.lora_B", (0, 0, 0), (1, 48, 4)
            )
        ],
    )[0]
    assert b.abs().max() > 1e-3  # the adapters were trained: the merge adds something

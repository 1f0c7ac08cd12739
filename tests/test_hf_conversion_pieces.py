"""A conversion stored for a target TP x PP: each rank reads its own shard, and every layout still loads it exactly.

The converter stores each tensor in the pieces megatron's ranks hold at the target TP (tp_pieces),
one file per rank. Read amplification is measured on real ranks: megatron's dist_checkpointing.load
at TP=2 of a tiny Llama whose tensors are large enough that file headers and metadata are small
beside them, counting the bytes each rank's process reads (/proc/self/io rchar, see
megamft.testing.checkpoint_reads) against the bytes of the parameters it holds. Exactness is proven
as in test_hf_conversion: the logits of checkpoints converted for TP=2 (x PP=2) equal transformers'
at the target layout and at others, dense and mixture-of-experts.
"""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import jobs  # noqa: E402
from hf_models import hf_logits, random_tokens, tiny_model  # noqa: E402

from megamft.checkpoint import hf_convert  # noqa: E402
from megamft.testing.checkpoint_reads import load_reads  # noqa: E402
from megamft.testing.distributed import launch  # noqa: E402

TP2 = ("parallel.tensor_model_parallel_size=2",)
MAX_READ_PER_HELD = 1.25


def _convert(hf_model, root: Path, tp: int, pp: int = 1) -> tuple[Path, Path]:
    hf_model.save_pretrained(root / "hf")
    hf_convert.hf_to_megatron(root / "hf", root / "megatron", tp=tp, pp=pp)
    return root / "hf", root / "megatron"


def test_each_tp_rank_reads_about_its_own_shard(tmp_path):
    """~17 MB per rank in fp32; GQA, a gated MLP (read twice per rank when stored whole) and untied
    vocab tensors, each split differently. Stored whole layer by layer, as before, each rank read 2.5x."""
    config = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    _, megatron_dir = _convert(tiny_model(config), tmp_path, tp=2)
    results = launch(
        load_reads,
        2,
        timeout=240,
        kwargs=dict(
            checkpoint=str(megatron_dir),
            model_yaml=str(megatron_dir / "megamft_model.yaml"),
            overrides=TP2,
        ),
    )
    for rank, counts in enumerate(results):
        assert counts["held"] > 15 * 2**20, counts  # large enough for the headers not to matter
        assert counts["read"] <= MAX_READ_PER_HELD * counts["held"], (
            rank,
            counts["read"] / counts["held"],
        )


DENSE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=256,
)
DENSE_CASES = {
    "llama-gqa-padded-vocab": transformers.LlamaConfig(**DENSE, tie_word_embeddings=False),
    "qwen2-bias-tied": transformers.Qwen2Config(**DENSE, tie_word_embeddings=True),
    # GELU MLP, biases on every linear, LayerNorm with bias
    "starcoder2": transformers.Starcoder2Config(
        **DENSE,
        use_bias=True,
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        sliding_window=None,
    ),
}
DENSE_LAYOUTS = {
    "tp2": (2, TP2),
    "pp2": (2, ("parallel.pipeline_model_parallel_size=2",)),
    "tp1": (1, ()),
}


@pytest.fixture(scope="module")
def dense_tp2_pp2(tmp_path_factory):
    return {
        name: _convert(tiny_model(config), tmp_path_factory.mktemp(name), tp=2, pp=2)
        for name, config in DENSE_CASES.items()
    }


@pytest.mark.parametrize("layout", list(DENSE_LAYOUTS))
def test_dense_pieces_load_exactly_at_any_layout(dense_tp2_pp2, layout):
    world_size, overrides = DENSE_LAYOUTS[layout]
    checkpoints = [(str(m), str(m / "megamft_model.yaml")) for _, m in dense_tp2_pp2.values()]
    tokens = [random_tokens(DENSE["vocab_size"]) for _ in checkpoints]
    results = launch(
        jobs.converted_logits_of_each,
        world_size,
        timeout=240,
        kwargs=dict(checkpoints=checkpoints, overrides=overrides, tokens=tokens),
    )
    ours = next(r for r in results if r is not None)
    for (name, (hf_dir, _)), mine, case_tokens in zip(dense_tp2_pp2.items(), ours, tokens):
        theirs = hf_logits(hf_dir, case_tokens)
        torch.testing.assert_close(
            mine[..., : DENSE["vocab_size"]], theirs, rtol=0, atol=1e-4, msg=name
        )


MOE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
MOE_CASES = {
    "mixtral": transformers.MixtralConfig(
        **MOE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
    ),
    # a gated shared expert, split over TP as a dense MLP
    "qwen2-moe": transformers.Qwen2MoeConfig(
        **MOE,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
    ),
}
MOE_LAYOUTS = {
    "tp2": (2, (*TP2, "parallel.sequence_parallel=true")),  # experts split over expert TP = TP = 2
    "tp2ep2": (
        2,
        (
            *TP2,
            "parallel.sequence_parallel=true",
            "parallel.expert_model_parallel_size=2",
            "parallel.expert_tensor_parallel_size=1",
        ),
    ),
}


@pytest.fixture(scope="module")
def moe_tp2(tmp_path_factory):
    return {
        name: _convert(tiny_model(config), tmp_path_factory.mktemp(name), tp=2)
        for name, config in MOE_CASES.items()
    }


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_expert_pieces_load_exactly(moe_tp2, layout):
    world_size, overrides = MOE_LAYOUTS[layout]
    checkpoints = [(str(m), str(m / "megamft_model.yaml")) for _, m in moe_tp2.values()]
    tokens = [random_tokens(MOE["vocab_size"]) for _ in checkpoints]
    results = launch(
        jobs.converted_logits_of_each,
        world_size,
        timeout=240,
        kwargs=dict(checkpoints=checkpoints, overrides=overrides, tokens=tokens),
    )
    ours = next(r for r in results if r is not None)
    for (name, (hf_dir, _)), mine, case_tokens in zip(moe_tp2.items(), ours, tokens):
        theirs = hf_logits(hf_dir, case_tokens)
        torch.testing.assert_close(
            mine[..., : MOE["vocab_size"]], theirs, rtol=0, atol=1e-4, msg=name
        )


def test_round_trip_of_pieces_is_bit_identical(dense_tp2_pp2, tmp_path):
    """The export reads the pieces back into the very tensors converted."""
    from hf_models import sharded_tensors
    from safetensors.torch import load_file

    hf_dir, megatron_dir = dense_tp2_pp2["starcoder2"]
    exported = hf_convert.megatron_to_hf(megatron_dir, tmp_path / "hf_out", hf_template=hf_dir)
    original = load_file(hf_dir / "model.safetensors")
    back = sharded_tensors(exported)
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)

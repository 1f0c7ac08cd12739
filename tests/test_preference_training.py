"""Preference objectives in the real megatron training step: exact over the global batch however the pairs
are cut (micro-batches, DP ranks), against a single-process run; DPO starts at ln 2 with the reference
computed from the starting weights at the run's layout."""

import math

import preference_jobs
import pytest
import torch

from megamft.testing.distributed import launch


def _run(
    weights, world, pairs_per_micro_batch, objective, steps=1, layout=(), fused=False, **packing
):
    return launch(
        preference_jobs.preference_step,
        world,
        timeout=300,
        kwargs=dict(
            weights_dir=weights,
            pairs_per_micro_batch=pairs_per_micro_batch,
            objective=objective,
            steps=steps,
            layout=layout,
            fused=fused,
            **packing,
        ),
    )[0]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_tensor_and_pipeline_parallel_steps_equal_one_process(initial_weights, layout):
    """Two steps of rpo (reference, pair loss and chosen NLL) at TP=2 or PP=2 against one process; loss and
    grad norm (the gradients' shards are laid out differently)."""
    parallel = {
        "tp2": "parallel.tensor_model_parallel_size=2",
        "pp2": "parallel.pipeline_model_parallel_size=2",
    }
    whole = _run(initial_weights, 1, 2, "rpo", steps=2)
    split = _run(initial_weights, 2, 2, "rpo", steps=2, layout=(parallel[layout],))
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_dp2_with_one_pair_per_micro_batch_equals_one_process_with_four(initial_weights, objective):
    whole, cut = _run(initial_weights, 1, 4, objective), _run(initial_weights, 2, 1, objective)
    assert abs(cut["loss"][0] - whole["loss"][0]) <= 1e-6 * abs(whole["loss"][0])
    assert abs(cut["grad_norm"] - whole["grad_norm"]) <= 1e-5 * whole["grad_norm"]
    torch.testing.assert_close(
        cut["grads"], whole["grads"], rtol=1e-5, atol=1e-5 * whole["grads"].abs().max().item()
    )
    if objective == "dpo":  # policy == reference at the first step, whatever the task weights
        assert whole["loss"][0] == pytest.approx(math.log(2), rel=1e-6)
        assert cut["metrics"][0]["rewards/margin"] == {"a": 0.0, "b": 0.0}


def test_fused_cross_entropy_at_tp2_equals_the_unfused_run(initial_weights):
    """DPO at TP=2 with the answers' log-probabilities from the fused loss's per-sample sums (torch path,
    vocab-parallel) against megatron's cross entropy: three steps' losses, metrics and rank 0's gradients."""
    layout = ("parallel.tensor_model_parallel_size=2",)
    plain = _run(initial_weights, 2, 2, "dpo", steps=3, layout=layout)
    fused = _run(initial_weights, 2, 2, "dpo", steps=3, layout=layout, fused=True)
    assert plain["loss"][2] != pytest.approx(
        plain["loss"][0], rel=1e-4
    )  # step 2 moved it (1: lr 0)
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert fused["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    torch.testing.assert_close(
        fused["grads"], plain["grads"], rtol=1e-5, atol=1e-6 * plain["grads"].abs().max().item()
    )
    # the reference is computed through the fused loss too: at the first step it equals the policy bitwise
    assert fused["metrics"][0]["rewards/margin"] == {"a": 0.0, "b": 0.0}
    margins = [r["metrics"][2]["rewards/margin"] for r in (fused, plain)]
    assert margins[0] == pytest.approx(margins[1], rel=1e-4)


def _tables(weights, world, lora=False):
    return launch(
        preference_jobs.reference_tables,
        world,
        timeout=300,
        kwargs=dict(weights_dir=weights, lora=lora),
    )[0]


def test_reference_table_is_the_same_at_dp2_and_matches_full_logits(initial_weights):
    one, two = _tables(initial_weights, 1), _tables(initial_weights, 2)
    for task in one["start"]:
        torch.testing.assert_close(
            torch.from_numpy(two["start"][task]),
            torch.from_numpy(one["start"][task]),
            rtol=1e-6,
            atol=1e-6,
        )
    task, pair = preference_jobs.synthetic_pairs()[1][0]
    torch.testing.assert_close(
        torch.from_numpy(one["start"][task][pair]), one["by_logits"].cpu(), rtol=1e-5, atol=1e-5
    )


def test_lora_base_with_adapters_off_is_the_starting_reference(initial_weights):
    out = _tables(initial_weights, 2, lora=True)
    assert (
        out["losses"][-1] < out["losses"][0]
    )  # the adapters learned (the first step has lr 0: warm-up)
    for task in out["start"]:
        start = torch.from_numpy(out["start"][task])
        torch.testing.assert_close(
            torch.from_numpy(out["adapters_off"][task]), start, rtol=1e-6, atol=1e-6
        )
        assert (torch.from_numpy(out["adapters_on"][task]) - start).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_a_tiny_run_learns_a_preference_rule_on_held_out_pairs(initial_weights, objective):
    out = launch(
        preference_jobs.preference_learning,
        1,
        timeout=600,
        kwargs=dict(weights_dir=initial_weights, objective=objective, steps=24),
    )[0]
    assert out["losses"][-1] < out["losses"][0]
    assert out["accuracy"] >= 0.8, out  # chance: 0.5


@pytest.mark.parametrize(
    "objective, world, backend, length, parallel",
    [
        ("dpo", 1, "local", 32, ()),
        ("simpo", 2, "torch", 24, ()),
        ("dpo", 2, "torch", 24, ("parallel.pipeline_model_parallel_size=2",)),
    ],
    ids=["dpo-one-process-mask", "simpo-dp2-row-documents", "dpo-pp2-row-documents"],
)
def test_packed_pairs_train_as_the_padded_ones(
    initial_weights, objective, world, backend, length, parallel
):
    """data.mode=pack for pairs: each micro-batch's documents packed into fewer rows (each document its own
    block: the local backend's dense mask, the torch backend's RowDocuments) give the padded run's losses,
    reward metrics over three steps, and the same first-step gradients and gradient norm, at the same
    layout. DP=2 at 24 positions: rank 1's first micro-batch needs 3 rows, the others 2, so they get an
    empty row (every micro-batch of the step has the fullest one's rows). PP=2: the stages pass one
    activation shape for all four micro-batches."""
    layout = (f"model.attention_backend={backend}", *parallel)
    attention = {"local": "mask", "torch": "rows"}[backend]
    pairs = 4 // world if not parallel else 2
    run = dict(steps=3, layout=layout, length=length)
    padded = _run(initial_weights, world, pairs, objective, **run)
    packed = _run(initial_weights, world, pairs, objective, packed_attention=attention, **run)
    assert len(set(packed["rows"])) == 1 and packed["rows"][0] < padded["rows"][0] == 2 * pairs
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
    assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)
    torch.testing.assert_close(
        packed["grads"], padded["grads"], rtol=1e-5, atol=1e-5 * padded["grads"].abs().max().item()
    )
    for got, want in zip(packed["metrics"], padded["metrics"], strict=True):
        for name, tasks in want.items():
            assert got[name] == pytest.approx(tasks, rel=1e-4, abs=1e-6), name

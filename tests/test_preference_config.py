"""The preference objectives' config keys: ranges, and the combinations that have no meaning refused by key."""

import pytest

from megamft.config import ConfigError, load_config, validate


def _problems(*overrides, world_size=1):
    cfg = load_config(None, list(overrides))
    try:
        validate(cfg, world_size)
    except ConfigError as err:
        return err.problems
    return []


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["loss.objective=dpo", "loss.mode=coba"], "loss.mode=coba balances per-task token losses"),
        (["loss.objective=simpo", "loss.mode=focal"], "loss.mode=focal balances"),
        (
            ["loss.objective=rpo", "loss.normalization=per_microbatch"],
            "loss.normalization=per_microbatch does not apply",
        ),
        (
            ["loss.objective=orpo", "loss.label_smoothing=0.1"],
            "loss.label_smoothing applies to dpo, rpo and simpo",
        ),
        (
            ["loss.objective=dpo", "loss.label_smoothing=0.5"],
            "loss.label_smoothing must be in [0, 0.5)",
        ),
        (["loss.objective=dpo", "loss.beta=0"], "loss.beta must be > 0"),
        (["loss.objective=ipo"], "'loss.objective' must be one of"),
        (
            ["loss.objective=simpo", "loss.reference_dir=/x", "checkpoint.load_dir=/y"],
            "loss.reference_dir applies to dpo and rpo",
        ),
        (
            ["loss.objective=dpo", "loss.reference_dir=/x"],
            "loss.reference_dir needs checkpoint.load_dir",
        ),
        (
            ["loss.objective=dpo", "train.micro_batch_size=3", "train.global_batch_size=6"],
            "train.micro_batch_size=3 counts sequences, two per preference pair",
        ),
        (
            ["loss.objective=dpo", "data.mode=pack", "model.attention_backend=te"],
            "data.mode=pack with loss.objective=dpo packs a pair micro-batch into several rows",
        ),
    ],
)
def test_meaningless_combinations_name_the_key(overrides, fragment):
    try:
        problems = _problems(*overrides)
    except ConfigError as err:  # a value refused while loading, before validation
        problems = [str(err)]
    assert len([p for p in problems if fragment in p]) == 1, problems


def test_context_parallel_is_refused_for_preference_only():
    cp = ["parallel.context_parallel_size=2"]
    assert any(
        "parallel.context_parallel_size must be 1" in p
        for p in _problems("loss.objective=dpo", *cp, world_size=2)
    )
    assert not any(
        "context_parallel_size must be 1" in p
        for p in _problems("loss.objective=sft", *cp, world_size=2)
    )


@pytest.mark.parametrize("objective", ["sft", "dpo", "rpo", "orpo", "simpo"])
def test_the_defaults_validate_for_every_objective(objective, tmp_path):
    from data_fixtures import as_line, run_preprocess

    line = (
        '{"prompt": "q", "chosen": "a", "rejected": "b"}'
        if objective != "sft"
        else as_line([("user", "q"), ("assistant", "a")], "messages")
    )
    out, _ = run_preprocess(tmp_path, {"t": [line]})
    cfg = load_config(
        None, [f"loss.objective={objective}", "data.source=indexed", f"data.path={out}"]
    )
    validate(cfg, 1)
    assert cfg.transformer.get("hidden_dropout", 0.0) == 0.0 and cfg.lora.dropout == 0.0


def test_the_data_kind_must_match_the_objective(tmp_path):
    from data_fixtures import as_line, run_preprocess

    pair = '{"prompt": "q", "chosen": "a", "rejected": "b"}'
    out, _ = run_preprocess(
        tmp_path,
        {"pairs": [pair], "plain": [as_line([("user", "q"), ("assistant", "a")], "messages")]},
    )
    data = ["data.source=indexed", f"data.path={out}"]
    dpo = _problems("loss.objective=dpo", *data)
    assert any("needs preference pairs, but task(s) ['plain']" in p for p in dpo), dpo
    sft = _problems(*data)
    assert any(
        "task(s) ['pairs'] of data.path" in p and "hold preference pairs" in p for p in sft
    ), sft
    assert any(
        "needs preference pairs: data.source=indexed" in p
        for p in _problems("loss.objective=simpo")
    )

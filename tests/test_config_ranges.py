"""Every config value checked before anything starts: ranges declared in the schema, megatron's pass-through
values, lists, empty values, task weights (megamft.config.ranges, megatron_sections, task_weights)."""

import dataclasses
import math
import typing

import pytest

from megamft.config import ConfigError, MegamftConfig, apply_override, load_config, validate
from megamft.config.megatron_sections import MEGATRON_CHECKS
from megamft.config.ranges import Range, leaves

NUMBERS = (int, float)


def _sections():
    return [
        (f.name, f.type)
        for f in dataclasses.fields(MegamftConfig)
        if dataclasses.is_dataclass(getattr(MegamftConfig(), f.name))
    ]


def _numeric_fields(cls) -> list[tuple[str, str, type, Range | None]]:
    """(field, where, scalar type, declared range) of every number inside every field's annotation."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return [
        (f.name, where, leaf, declared)
        for f in dataclasses.fields(cls)
        for where, leaf, declared in leaves(hints[f.name])
        if leaf in NUMBERS
    ]


def _unranged(cls) -> list[str]:
    return [
        f"{name}{where}" for name, where, _, declared in _numeric_fields(cls) if declared is None
    ]


def test_every_numeric_field_of_the_schema_declares_its_range():
    config = MegamftConfig()
    missing = [
        f"{section}.{key}"
        for section, _ in _sections()
        for key in _unranged(type(getattr(config, section)))
    ]
    assert not missing, (
        f"numeric config keys without a declared range (see megamft.config.ranges): {missing}"
    )


def test_the_guard_finds_a_numeric_field_without_a_range():
    @dataclasses.dataclass
    class Section:
        size: typing.Optional[int] = None
        weights: dict[str, float] = dataclasses.field(default_factory=dict)
        name: str = "x"
        flag: bool = False

    assert _unranged(Section) == ["size", "weights{}"]


def _outside(declared: Range, leaf: type) -> list:
    """Values just outside a range (and a NaN for floats): an independent reading of its bounds."""
    step = 1 if leaf is int else 1e-6
    values = []
    if declared.low is not None:
        values.append(leaf(declared.low) if declared.low_open else leaf(declared.low - step))
    if declared.high is not None:
        values.append(leaf(declared.high) if declared.high_open else leaf(declared.high + step))
    return values + ([math.nan, math.inf] if leaf is float else [])


def _schema_cases():
    config = MegamftConfig()
    for section, _ in _sections():
        for name, where, leaf, declared in _numeric_fields(type(getattr(config, section))):
            for value in _outside(declared, leaf):
                yield pytest.param(
                    section, name, where, value, id=f"{section}.{name}{where}={value}"
                )


@pytest.mark.parametrize("section, name, where, value", list(_schema_cases()))
def test_every_declared_range_is_enforced(section, name, where, value):
    cfg = MegamftConfig()
    setattr(
        getattr(cfg, section),
        name,
        {"some_task": value} if where == "{}" else [value] if where == "[]" else value,
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert any(p.startswith(f"{section}.{name} must be ") for p in err.value.problems), (
        err.value.problems
    )


def test_values_on_the_bounds_pass():
    overrides = [
        "optimizer.adam_beta1=0",
        "optimizer.weight_decay=0",
        "transformer.hidden_dropout=1",
        "data.valid_samples_per_task=0",
        "train.eval_interval=0",
        "train.seed=4294967295",
        "loss.coba_min_weight=1",
        "model.rope_scaling_factor=1",
        "optimizer.clip_grad=0",
        "optimizer.min_lr=0.001",
        "optimizer.lr=0.001",
        "loss.mode=token",
    ]
    validate(load_config(None, overrides), 1)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optimizer.lr=-1e-4"], "optimizer.lr must be >= 0, got -0.0001"),
        (["optimizer.lr=.nan"], "optimizer.lr must be a finite number >= 0, got nan"),
        (["optimizer.lr=null"], "optimizer.lr must be set"),
        (
            ["optimizer.min_lr=1e-3", "optimizer.lr=1e-4"],
            "optimizer.min_lr (0.001) must not exceed optimizer.lr (0.0001)",
        ),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay must be >= 0"),
        (["optimizer.clip_grad=-1"], "optimizer.clip_grad must be >= 0"),
        (["optimizer.adam_beta2=1"], "optimizer.adam_beta2 must be in [0, 1), got 1.0"),
        (["optimizer.adam_eps=0"], "optimizer.adam_eps must be > 0"),
        (["optimizer.initial_loss_scale=0"], "optimizer.initial_loss_scale must be > 0"),
        (
            ["optimizer.min_loss_scale=1024", "optimizer.initial_loss_scale=16"],
            "must not exceed optimizer.initial_loss_scale",
        ),
        (["optimizer.optimizer=adamw"], "optimizer.optimizer must be one of ['adam', 'sgd']"),
        (
            ["transformer.hidden_dropout=1.5"],
            "transformer.hidden_dropout must be in [0, 1], got 1.5",
        ),
        (["transformer.attention_dropout=-0.1"], "transformer.attention_dropout must be in [0, 1]"),
        (
            ["transformer.recompute_num_layers=0"],
            "transformer.recompute_num_layers must be >= 1, got 0",
        ),
        (
            ["transformer.recompute_granularity=full"],
            "transformer.recompute_granularity=full needs transformer.recompute_method",
        ),
        (
            [
                "transformer.recompute_granularity=full",
                "transformer.recompute_method=uniform",
                "transformer.recompute_num_layers=3",
            ],
            "transformer.recompute_num_layers (3) exceeds the 2 layer(s)",
        ),
        (
            ["transformer.recompute_method=block"],
            "does nothing without transformer.recompute_granularity=full",
        ),
        (
            ["transformer.recompute_granularity=selective", "transformer.recompute_num_layers=1"],
            "takes no transformer.recompute_num_layers",
        ),
        (["ddp.bucket_size=0"], "ddp.bucket_size must be >= 1"),
        (
            ["transformer.embedding_init_method_std=.inf"],
            "transformer.embedding_init_method_std must be a finite number > 0, got inf",
        ),
        (
            ["loss.task_weights={a: .nan}"],
            "loss.task_weights must be a finite number >= 0 for each entry, got {'a': nan}",
        ),
        (
            ["data.task_sampling=weights", "data.task_sampling_weights={a: 0, b: 0}"],
            "gives every task weight 0",
        ),
        (["lora.enabled=true", "lora.targets=[]"], "lora.targets must name some of"),
        (["train.seed=-1"], "train.seed must be in [0, 4294967295], got -1"),
        (
            ["model.num_layers=0", "model.hidden_size=-64"],
            "model.hidden_size must be >= 1, got -64",
        ),
    ],
)
def test_each_mistake_is_named(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, overrides), 1)
    assert any(fragment in p for p in err.value.problems), err.value.problems


def test_megatron_checks_name_real_fields_with_matching_types():
    from megamft.config.loading import _megatron_schemas

    for section, checks in MEGATRON_CHECKS.items():
        schema = _megatron_schemas()[section]
        hints = typing.get_type_hints(schema)
        for key, check in checks.items():
            assert key in hints, f"{section}.{key} is not a field of {schema.__name__}"
            kinds = {leaf for _, leaf, _ in leaves(hints[key])}
            assert (kinds & set(NUMBERS)) if isinstance(check, Range) else str in kinds, (
                section,
                key,
                kinds,
            )


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "lora.targets=linear_qkv",
            "'lora.targets' must be a list, got 'linear_qkv': write [a, b] in YAML",
        ),
        (
            "lora.targets=[linear_qkv, 3]",
            None,
        ),  # items are strings: 3 becomes '3', refused as an unknown target
        (
            "transformer.recompute_modules=core_attn",
            "'transformer.recompute_modules' must be a list",
        ),
        ("data.path=", "override 'data.path=' has no value after '='; give one, or data.path=null"),
        ('checkpoint.save_dir=""', "'checkpoint.save_dir' is an empty path"),
        ("data.tokenizer=' '", "'data.tokenizer' is empty"),
        ("model.num_layers=[2", "the value is not valid YAML"),
    ],
)
def test_lists_and_empty_values(override, fragment):
    if fragment is None:
        cfg = MegamftConfig()
        apply_override(cfg, override)
        assert cfg.lora.targets == ["linear_qkv", "3"]
        with pytest.raises(ConfigError, match="lora.targets must name some of"):
            validate(cfg, 1)
        return
    with pytest.raises(ConfigError) as err:
        apply_override(MegamftConfig(), override)
    assert fragment in str(err.value)


def test_a_list_is_taken_in_every_written_form(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  targets:\n    - linear_qkv\n    - linear_proj\n")
    assert load_config(path).lora.targets == ["linear_qkv", "linear_proj"]
    assert load_config(None, ["lora.targets=[linear_fc1]"]).lora.targets == ["linear_fc1"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file {path} is empty"):
        load_config(path)


def test_an_empty_config_path_is_refused():
    with pytest.raises(ConfigError, match="--config was given an empty path"):
        load_config([""])

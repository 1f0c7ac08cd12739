"""megamft's one typed config tree: YAML plus dotted ``key=value`` overrides.

Sections megamft owns (``model``, ``parallel``, ``data``, ``train``,
``checkpoint``) are dataclasses with a docstring per field. Sections that
megatron-core already types (``optimizer``, ``ddp``, ``transformer``) are not
re-declared here: their keys are checked against megatron's own dataclasses
(``OptimizerConfig``, ``DistributedDataParallelConfig``, ``TransformerConfig``)
and passed straight through. Unknown keys are errors. ``validate`` checks the
cross-section rules (divisibility, world size) before any process group starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names each offending key."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid megamft config ({len(self.problems)} problem(s)):\n{lines}")


@dataclass
class ModelConfig:
    """Architecture of a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

    num_layers: int = 2
    """Transformer layers in the whole model (split across pipeline stages)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    ffn_hidden_size: int = 176
    """Inner width of the SwiGLU MLP."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means one per query head."""
    vocab_size: Optional[int] = None
    """Vocabulary size; None takes it from the tokenizer."""
    max_position_embeddings: int = 4096
    """Longest sequence RoPE is prepared for."""
    rotary_base: float = 10000.0
    """RoPE theta (CodeLlama uses 1e6)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share input embedding and output projection weights."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen2)."""
    rope_scaling_factor: Optional[float] = None
    """Linear RoPE scaling (position interpolation) factor, e.g. 4.0 for DeepSeek-Coder."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary up to a multiple of this (independent of TP, so checkpoints reshard)."""
    hf_architecture: Optional[str] = None
    """Hugging Face architecture this model converts to (set by megamft-convert)."""
    sliding_window: Optional[int] = None
    """Attention window of the original model (Mistral); sequences may not exceed it (no windowed kernel)."""
    init_method_std: float = 0.02
    """Standard deviation of the random initialisation."""


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes."""

    tensor_model_parallel_size: int = 1
    """TP: each layer's matrices are split over this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: layers are split into this many stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage for the interleaved schedule (None = off)."""
    context_parallel_size: int = 1
    """CP: the sequence is split over this many ranks inside attention."""
    data_parallel_size: Optional[int] = None
    """DP: replicas; None derives it as world_size / (TP * PP * CP)."""
    sequence_parallel: bool = False
    """Split norms and dropout along the sequence across TP ranks (needs TP > 1)."""


@dataclass
class DataConfig:
    """Where training samples come from and how they become sequences."""

    source: Literal["stdlib", "indexed"] = "stdlib"
    """'stdlib': the embedded multitask corpus built from Python's own library, encoded in memory.
    'indexed': a megamft-preprocess output folder, given as data.path."""
    path: Optional[str] = None
    """data.source=indexed: the folder holding manifest.json and the .bin/.idx files."""
    tokenizer: str = "byte"
    """data.source=stdlib: 'byte', a sentencepiece .model or a tokenizer.json (tools/train_tokenizer.py)."""
    template: str = "mftcoder"
    """data.source=stdlib: chat template (mftcoder, chatml, llama2, hf)."""
    seq_length: int = 256
    """Tokens per training sequence."""
    mode: Literal["pad", "dynamic", "pack", "concat"] = "pack"
    """pad: one sample per sequence padded to seq_length; dynamic: padded to the micro-batch's longest;
    pack: whole samples packed best-fit, attention kept inside each sample; concat: MFTCoder's next-fit."""
    pack_window: int = 1000
    """pack: samples considered together when choosing sequences (larger: less padding, coarser shuffle)."""
    pad_to_multiple_of: int = 8
    """dynamic: round each micro-batch's length up to this multiple."""
    task_sampling: Literal["proportional", "uniform", "weights"] = "proportional"
    """How tasks are mixed: in proportion to their sizes, equally, or by data.task_sampling_weights."""
    task_sampling_weights: dict[str, float] = field(default_factory=dict)
    """data.task_sampling=weights: relative sampling weight per task name (absent tasks: 0)."""
    epoch_samples: Optional[int] = None
    """Samples per data epoch, split over tasks by weight (None: every training sample once)."""
    max_samples_per_task: Optional[int] = None
    """Cap on training samples taken from each task (None = all)."""
    valid_samples_per_task: int = 32
    """Samples of each task held out for validation."""
    seed: int = 1234
    """Split, mixing and shuffling seed; the same seed gives the same batches on every layout."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    micro_batch_size: int = 2
    """Sequences per forward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    train_steps: int = 40
    """Optimizer steps to run."""
    seed: int = 1234
    """Seed for weight init and dropout."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision; bf16/fp16 keep fp32 master weights in the optimizer."""
    lr_warmup_steps: int = 4
    """Linear warm-up steps of the learning rate."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, down to optimizer.min_lr."""
    log_interval: int = 5
    """Steps between log lines."""
    eval_interval: int = 0
    """Steps between validations (0 = only before and after training)."""
    peak_tflops_per_device: Optional[float] = None
    """Peak dense TFLOP/s of one device for MFU (H100 SXM bf16: 989); None = do not report MFU."""
    max_skipped_steps: int = 3
    """Stop after this many steps in a row with a non-finite loss or gradient (each is skipped)."""
    tensorboard_dir: Optional[str] = None
    """Where tensorboard event files go (None: <checkpoint.save_dir>/tensorboard, or nowhere)."""


@dataclass
class LossConfig:
    """How per-token losses of many tasks become one loss (see megamft.loss.multitask)."""

    mode: Literal["token", "sample", "task_token", "task_sample", "focal", "coba", "famo"] = "task_token"
    """token/sample/task_token/task_sample: MFTCoder cases 1-4; focal, coba, famo: dynamic task weights."""
    normalization: Literal["global_batch", "per_microbatch"] = "global_batch"
    """Count tokens and samples over the whole global batch (exact), or per micro-batch as MFTCoder does."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Static weight per task name (others weigh 1.0); combines with every mode."""
    focal_gamma: float = 2.0
    """Focusing exponent of the focal mode."""
    fused_cross_entropy: bool = False
    """Compute the loss with megamft's fused kernels (csrc/) instead of megatron's cross entropy."""
    coba_update_interval: int = 5
    """Steps between CoBa's validation measurements."""
    coba_history: int = 20
    """Measurements in CoBa's slope-fitting window."""
    coba_warmup: int = 3
    """Measurements before CoBa moves away from uniform weights."""
    coba_temperature: float = 5.0
    """CoBa's divergence-factor temperature."""
    coba_min_weight: Optional[float] = None
    """Floor of every CoBa weight (None = 1 / (10 x tasks))."""
    famo_lr: float = 0.025
    """Step size of FAMO's task logits."""
    famo_decay: float = 1e-3
    """Weight decay of FAMO's task logits."""


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoraConfig:
    """Low-rank adapters on the attention and MLP projections (TP-aware, base frozen)."""

    enabled: bool = False
    """Train adapters only; the optimizer holds adapter parameters alone."""
    rank: int = 8
    """Adapter rank r."""
    alpha: float = 16.0
    """Scale alpha: the adapter output is multiplied by alpha / r."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Which projections get adapters (of linear_qkv, linear_proj, linear_fc1, linear_fc2)."""
    seed: int = 1234
    """Seed of A's initialization (B starts at zero, so training starts from the base model)."""
    save_adapters_only: bool = False
    """Checkpoints hold adapters and their optimizer state only; they name the base checkpoint
    (checkpoint.load_dir of the first run), which resuming and export read."""


@dataclass
class CheckpointConfig:
    """Saving and resuming megatron dist checkpoints."""

    save_dir: Optional[str] = None
    """Folder for checkpoints (None = never save)."""
    save_interval: int = 0
    """Steps between saves (0 = only at the end)."""
    load_dir: Optional[str] = None
    """Resume from the latest complete checkpoint in this folder."""
    load_iteration: Optional[int] = None
    """Resume from this iteration instead of the latest one (to roll back)."""
    load_optimizer: bool = True
    """Restore optimizer, scheduler and progress with the weights (False: weights only, a new fine-tune)."""
    keep_last: int = 0
    """Keep only the newest N checkpoints in save_dir (0 = keep all)."""
    save_on_signal: bool = True
    """On SIGTERM or SIGUSR1 (preemption), save after the current step and exit cleanly."""
    async_save: bool = False
    """Write checkpoints from background processes while training goes on (megatron's async save)."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the latest checkpoint in save_dir when there is one (so re-running the same
    command after a kill or requeue continues the run), else start from load_dir's weights; never: load
    load_dir as configured (load_optimizer decides resume or weights only)."""
    overwrite: bool = False
    """Write into a save_dir that holds other files, or start a new run over this run's checkpoints."""
    allow_config_change: bool = False
    """Load a checkpoint whose model section, or resume a run whose model/data/loss/LoRA/seed/global
    batch/precision, differ from this config (each difference is logged instead of refused)."""


@dataclass
class MegamftConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    optimizer: dict = field(default_factory=lambda: {"lr": 1e-3, "min_lr": 1e-4, "clip_grad": 1.0})
    """Fields of megatron.core.optimizer.OptimizerConfig."""
    ddp: dict = field(default_factory=dict)
    """Fields of megatron.core.distributed.DistributedDataParallelConfig."""
    transformer: dict = field(default_factory=dict)
    """Extra fields of megatron.core.transformer.TransformerConfig (e.g. recompute_granularity)."""


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
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "virtual_pipeline_model_parallel_size", "sequence_parallel", "normalization",
    "gated_linear_unit", "activation_func", "add_bias_linear", "layernorm_epsilon",
    "init_method_std", "params_dtype", "pipeline_dtype", "bf16", "fp16", "calculate_per_token_loss",
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
    cfg = MegamftConfig()
    for path in map(Path, paths):
        _apply_dict(cfg, _read_yaml(path), origin=str(path))
    for item in overrides:
        apply_override(cfg, item)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice (first on line {seen[key] + 1}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so errors name the file
            raw = yaml.load(stream, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
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
    value = yaml.safe_load(text) if text.strip() else None
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
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{dotted}': cannot use {value!r}")
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
        return str(value)
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        return origin(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{dotted}' must be a mapping like {{name: value}}, got {value!r}")
        key_type, value_type = args
        return {_coerce(f"{dotted}.{k}", k, key_type): _coerce(f"{dotted}.{k}", v, value_type)
                for k, v in value.items()}
    raise ConfigError(f"'{dotted}' has type {annotation} and cannot be set from a config file")


def to_dict(cfg: MegamftConfig) -> dict:
    """The resolved config as plain data (saved beside every checkpoint)."""
    return dataclasses.asdict(cfg)


def data_parallel_size(cfg: MegamftConfig, world_size: int) -> int:
    """DP replicas for this world size (assumes ``validate`` passed)."""
    p = cfg.parallel
    return world_size // (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    )


def validate(cfg: MegamftConfig, world_size: int) -> None:
    """Check cross-section rules; raise one ConfigError listing every problem."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    problems = _model_problems(cfg) + _parallel_problems(cfg, world_size)
    problems += _batch_problems(cfg, world_size) + _data_problems(cfg) + _lora_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _context_parallel_problems(cfg: MegamftConfig, cp: int, tp: int) -> list[str]:
    """CP splits every sequence into 2 x CP chunks inside Transformer Engine's attention."""
    problems = []
    multiple = 2 * cp * (tp if cfg.parallel.sequence_parallel else 1)
    if cfg.data.seq_length % multiple:
        problems.append(f"data.seq_length ({cfg.data.seq_length}) must be divisible by {multiple} "
                        "(2 x CP, x TP with sequence parallel) with context parallelism")
    if cfg.data.mode == "dynamic" and cfg.data.pad_to_multiple_of % multiple:
        problems.append(f"data.pad_to_multiple_of must be a multiple of {multiple} with context parallelism")
    if cfg.data.mode == "pack":
        problems.append("data.mode=pack is not supported with context parallelism yet; use pad, dynamic or concat")
    if cfg.loss.mode == "focal":
        problems.append("loss.mode=focal needs whole samples' losses on one rank; not with context parallelism")
    return problems


def _lora_problems(cfg: MegamftConfig) -> list[str]:
    if cfg.lora.save_adapters_only and not (cfg.lora.enabled and cfg.checkpoint.load_dir):
        return ["lora.save_adapters_only needs lora.enabled=true and checkpoint.load_dir (the base weights, "
                "or an earlier LoRA checkpoint of this run)"]
    return []


def _data_problems(cfg: MegamftConfig) -> list[str]:
    d = cfg.data
    problems = []
    if d.source == "indexed" and not d.path:
        problems.append("data.source=indexed needs data.path, a megamft-preprocess output folder")
    if d.source == "indexed" and d.path and not (Path(d.path) / "manifest.json").is_file():
        problems.append(f"data.path={d.path} has no manifest.json; run megamft-preprocess --out {d.path} first")
    if d.task_sampling == "weights" and not d.task_sampling_weights:
        problems.append("data.task_sampling=weights needs data.task_sampling_weights, e.g. {code_completion: 2.0}")
    if d.task_sampling_weights and d.task_sampling != "weights":
        problems.append("data.task_sampling_weights is set but data.task_sampling is not 'weights'")
    if d.pack_window < 1 or d.pad_to_multiple_of < 1:
        problems.append("data.pack_window and data.pad_to_multiple_of must be >= 1")
    tp = cfg.parallel.tensor_model_parallel_size
    if d.mode == "dynamic" and cfg.parallel.sequence_parallel and tp > 0 and d.pad_to_multiple_of % tp:
        problems.append(f"data.pad_to_multiple_of ({d.pad_to_multiple_of}) must be a multiple of "
                        f"parallel.tensor_model_parallel_size ({tp}) with sequence parallel")
    if d.epoch_samples is not None and d.epoch_samples < 1:
        problems.append(f"data.epoch_samples must be >= 1 or null, got {d.epoch_samples}")
    return problems


def _model_problems(cfg: MegamftConfig) -> list[str]:
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    groups = m.num_query_groups or m.num_attention_heads
    problems = []
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        if getattr(m, name) < 1:
            problems.append(f"model.{name} must be positive, got {getattr(m, name)}")
    if m.num_attention_heads > 0 and m.hidden_size % m.num_attention_heads:
        problems.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({m.num_attention_heads})"
        )
    if groups > 0 and m.num_attention_heads % groups:
        problems.append(
            f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
            f"model.num_query_groups ({groups})"
        )
    if tp > 0 and m.num_attention_heads % tp:
        problems.append(
            f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if tp > 0 and groups % tp:
        problems.append(
            f"model.num_query_groups ({groups}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if tp > 0 and m.ffn_hidden_size % tp:
        problems.append(
            f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    positive = {"data.seq_length": cfg.data.seq_length, "train.log_interval": cfg.train.log_interval,
                "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by}
    if m.num_query_groups is not None:
        positive["model.num_query_groups"] = m.num_query_groups
    problems += [f"{k} must be >= 1, got {v}" for k, v in positive.items() if v < 1]
    non_negative = {"data.valid_samples_per_task": cfg.data.valid_samples_per_task,
                    "train.eval_interval": cfg.train.eval_interval,
                    "checkpoint.save_interval": cfg.checkpoint.save_interval}
    problems += [f"{k} must be >= 0, got {v}" for k, v in non_negative.items() if v < 0]
    if m.sliding_window and cfg.data.seq_length > m.sliding_window:
        problems.append(
            f"data.seq_length ({cfg.data.seq_length}) exceeds model.sliding_window ({m.sliding_window}); "
            "megamft has no windowed attention, so sequences must fit in the window"
        )
    if cfg.data.seq_length > m.max_position_embeddings:
        problems.append(
            f"data.seq_length ({cfg.data.seq_length}) exceeds "
            f"model.max_position_embeddings ({m.max_position_embeddings})"
        )
    return problems


def _parallel_problems(cfg: MegamftConfig, world_size: int) -> list[str]:
    p = cfg.parallel
    sizes = {
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "context_parallel_size": p.context_parallel_size,
    }
    problems = [f"parallel.{k} must be >= 1, got {v}" for k, v in sizes.items() if v < 1]
    if problems:
        return problems
    tp, pp, cp = sizes.values()
    vpp = p.virtual_pipeline_model_parallel_size
    stages = pp * (vpp or 1)
    if cfg.model.num_layers % stages:
        what = f"pipeline_model_parallel_size ({pp})"
        if vpp:
            what += f" x virtual_pipeline_model_parallel_size ({vpp})"
        problems.append(f"model.num_layers ({cfg.model.num_layers}) must be divisible by parallel.{what}")
    if vpp is not None and (vpp < 1 or pp < 2):
        problems.append(
            "parallel.virtual_pipeline_model_parallel_size needs "
            f"pipeline_model_parallel_size >= 2 and a value >= 1 (got PP={pp}, VPP={vpp})"
        )
    if p.sequence_parallel and tp < 2:
        problems.append("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    if p.sequence_parallel and cfg.data.seq_length % tp:
        problems.append(
            f"data.seq_length ({cfg.data.seq_length}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp}) with sequence parallel"
        )
    if cp > 1:
        problems += _context_parallel_problems(cfg, cp, tp)
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}; "
            "change the parallel sizes or the number of processes"
        )
    elif p.data_parallel_size is not None and p.data_parallel_size * model_parallel != world_size:
        problems.append(
            f"world size {world_size} != TP x PP x CP x DP = {tp} x {pp} x {cp} x "
            f"{p.data_parallel_size} (parallel.data_parallel_size)"
        )
    return problems


def _batch_problems(cfg: MegamftConfig, world_size: int) -> list[str]:
    t = cfg.train
    p = cfg.parallel
    model_parallel = (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    )
    if min(t.micro_batch_size, t.global_batch_size, t.train_steps) < 1 or model_parallel < 1:
        return ["train.micro_batch_size, train.global_batch_size and train.train_steps must be >= 1"]
    if world_size % model_parallel:
        return []  # already reported; DP is undefined
    dp = world_size // model_parallel
    problems = []
    if t.global_batch_size % (t.micro_batch_size * dp):
        problems.append(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
        )
    if 0 < cfg.data.valid_samples_per_task < t.micro_batch_size * dp:
        problems.append(
            f"data.valid_samples_per_task ({cfg.data.valid_samples_per_task}) must be at least "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) to validate"
        )
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp and not problems:
        microbatches = t.global_batch_size // (t.micro_batch_size * dp)
        if microbatches % p.pipeline_model_parallel_size:
            problems.append(
                f"the interleaved schedule needs micro-batches per step ({microbatches}) "
                f"divisible by parallel.pipeline_model_parallel_size "
                f"({p.pipeline_model_parallel_size})"
            )
    unknown_targets = sorted(set(cfg.lora.targets) - set(LORA_TARGETS))
    if unknown_targets or cfg.lora.rank < 1:
        problems.append(f"lora.rank must be >= 1 and lora.targets a subset of {list(LORA_TARGETS)} "
                        f"(got rank {cfg.lora.rank}, unknown targets {unknown_targets})")
    if cfg.loss.fused_cross_entropy and cfg.loss.mode == "focal":
        problems.append("loss.fused_cross_entropy does not support loss.mode=focal (its weights need the "
                        "per-token losses first); use the default cross entropy for focal")
    bad_weights = {k: v for k, v in cfg.loss.task_weights.items() if v < 0}
    if bad_weights:
        problems.append(f"loss.task_weights must be >= 0, got {bad_weights}")
    if cfg.loss.coba_update_interval < 1 or cfg.loss.coba_history < 2:
        problems.append("loss.coba_update_interval must be >= 1 and loss.coba_history >= 2")
    if t.lr_warmup_steps < 0 or t.lr_warmup_steps >= t.train_steps:
        problems.append(
            f"train.lr_warmup_steps ({t.lr_warmup_steps}) must be at least 0 and less than "
            f"train.train_steps ({t.train_steps})"
        )
    return problems

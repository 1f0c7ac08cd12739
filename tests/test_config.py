"""Config loading, overrides and validation: one clear message per mistake."""

import subprocess
import sys

import pytest

from megamft.config import ConfigError, MegamftConfig, apply_override, load_config, validate


def _problems(*overrides, world_size=4):
    cfg = load_config(None, list(overrides))
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size)
    return err.value.problems


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layers: 8\noptimizer:\n  lr: 3e-4\n")
    cfg = load_config(
        path, ["train.train_steps=7", "ddp.overlap_grad_reduce=true", "model.num_query_groups=null"]
    )
    assert cfg.model.num_layers == 8
    assert cfg.optimizer["lr"] == pytest.approx(3e-4) and isinstance(cfg.optimizer["lr"], float)
    assert cfg.train.train_steps == 7
    assert cfg.ddp == {"overlap_grad_reduce": True}
    assert cfg.model.num_query_groups is None


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("model.nope=1", "unknown key 'model.nope'"),
        ("nosection.x=1", "unknown section 'nosection'"),
        ("model.num_layers=two", "'model.num_layers' must be int"),
        ("model.num_layers=2.5", "'model.num_layers' must be a whole number"),
        ("parallel.sequence_parallel=maybe", "'parallel.sequence_parallel' must be true or false"),
        ("train.precision=int8", "'train.precision' must be one of"),
        (
            "optimizer.learning_rate=1",
            "'optimizer.learning_rate' is not a field of megatron.core.optimizer",
        ),
        ("ddp.bucket_sizes=1", "'ddp.bucket_sizes' is not a field of megatron.core.distributed"),
        ("transformer.num_layers=3", "'transformer.num_layers' is derived by megamft"),
        ("optimizer.bf16=true", "'optimizer.bf16' is derived by megamft; set train.precision"),
        ("model.num_layers", "must look like section.key=value"),
    ],
)
def test_bad_override_names_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        apply_override(MegamftConfig(), override)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "text, key, line",
    [
        (
            "model:\n  num_layers: 2\ntrain:\n  train_steps: 3\nmodel:\n  hidden_size: 64\n",
            "model",
            5,
        ),
        ("train:\n  train_steps: 3\n  micro_batch_size: 2\n  train_steps: 5\n", "train_steps", 4),
    ],
    ids=["section", "key"],
)
def test_a_key_given_twice_is_an_error_naming_file_and_line(tmp_path, text, key, line):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert (
        f"'{key}' is given twice" in message and str(path) in message and f"line {line}," in message
    )


def test_later_config_files_win(tmp_path):
    base, extra = tmp_path / "base.yaml", tmp_path / "extra.yaml"
    base.write_text("model:\n  num_layers: 8\n  hidden_size: 256\n")
    extra.write_text("model:\n  num_layers: 12\n")
    cfg = load_config([base, extra], ["model.hidden_size=512"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (12, 512)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layerz: 2\ntrain: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(err.value.problems) == 2
    assert all(str(path) in p for p in err.value.problems)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "overrides,world_size,fragment",
    [
        (
            ["parallel.tensor_model_parallel_size=3", "model.num_attention_heads=4"],
            3,
            "model.num_attention_heads (4) must be divisible by parallel.tensor_model_parallel_size (3)",
        ),
        (
            [
                "parallel.tensor_model_parallel_size=4",
                "model.num_attention_heads=12",
                "model.num_query_groups=6",
            ],
            4,
            "model.num_query_groups (6) must be divisible by parallel.tensor_model_parallel_size (4) or divide it",
        ),
        (
            ["model.num_attention_heads=4", "model.num_query_groups=3"],
            1,
            "model.num_attention_heads (4) must be divisible by model.num_query_groups (3)",
        ),
        (
            ["parallel.pipeline_model_parallel_size=4", "model.num_layers=6"],
            4,
            "model.num_layers (6) must be divisible by parallel.pipeline_model_parallel_size (4)",
        ),
        (
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
                "model.num_layers=6",
            ],
            2,
            "x virtual_pipeline_model_parallel_size (2)",
        ),
        (
            ["train.global_batch_size=6", "train.micro_batch_size=2"],
            2,
            "train.global_batch_size (6) must be divisible by train.micro_batch_size (2) x data-parallel size (2)",
        ),
        (
            ["parallel.tensor_model_parallel_size=2"],
            3,
            "world size 3 is not divisible by TP x PP x CP = 2 x 1 x 1",
        ),
        (["parallel.data_parallel_size=4"], 2, "world size 2 != TP x PP x CP x DP"),
        (
            ["parallel.sequence_parallel=true"],
            1,
            "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1",
        ),
        (
            ["parallel.virtual_pipeline_model_parallel_size=2"],
            1,
            "needs pipeline_model_parallel_size >= 2",
        ),
        (
            ["train.lr_warmup_steps=5", "train.train_steps=5"],
            1,
            "train.lr_warmup_steps (5) must be at least 0 and less than train.train_steps (5)",
        ),
        (
            ["parallel.context_parallel_size=2"],
            2,
            "data.mode=pack is not supported with context parallelism",
        ),
        (
            ["parallel.context_parallel_size=2", "data.mode=pad", "data.seq_length=190"],
            2,
            "must be divisible by 4",
        ),
        (["train.log_interval=0"], 1, "train.log_interval must be >= 1, got 0"),
        (["data.seq_length=0"], 1, "data.seq_length must be >= 1, got 0"),
        (["model.num_query_groups=0"], 1, "model.num_query_groups must be >= 1, got 0"),
        (
            ["data.valid_samples_per_task=3", "train.micro_batch_size=2"],
            2,
            "data.valid_samples_per_task (3) must be at least train.micro_batch_size (2) x data-parallel size (2)",
        ),
        (["loss.task_weights={a: -1}"], 1, "loss.task_weights must be >= 0"),
        (
            ["loss.fused_cross_entropy=true", "loss.mode=focal"],
            1,
            "loss.fused_cross_entropy does not support",
        ),
        (
            ["data.seq_length=8192"],
            1,
            "data.seq_length (8192) exceeds model.max_position_embeddings (4096)",
        ),
        (
            ["ddp.overlap_param_gather=true"],
            2,
            "ddp.overlap_param_gather needs ddp.overlap_grad_reduce=true",
        ),
        (
            [
                "ddp.overlap_param_gather=true",
                "ddp.overlap_grad_reduce=true",
                "optimizer.use_distributed_optimizer=false",
            ],
            2,
            "ddp.overlap_param_gather needs optimizer.use_distributed_optimizer=true",
        ),
    ],
)
def test_validation_names_each_problem(overrides, world_size, fragment):
    problems = _problems(*overrides, world_size=world_size)
    assert any(fragment in p for p in problems), problems


def test_world_size_must_be_positive():
    with pytest.raises(ConfigError, match="world size must be >= 1, got 0"):
        validate(load_config(None), 0)


def test_strings_do_not_take_booleans():
    with pytest.raises(ConfigError, match="'checkpoint.save_dir' must be a string"):
        load_config(None, ["checkpoint.save_dir=off"])


def test_all_problems_reported_at_once():
    problems = _problems(
        "parallel.tensor_model_parallel_size=3",
        "parallel.sequence_parallel=true",
        "train.global_batch_size=7",
        world_size=6,
    )
    assert len(problems) >= 4


def test_valid_layouts_pass():
    for world_size, overrides in [
        (1, []),
        (4, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]),
    ]:
        validate(load_config(None, overrides), world_size)


def test_cli_rejects_bad_config_before_starting_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megamft", "train", "parallel.tensor_model_parallel_size=3"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"WORLD_SIZE": "2", "PATH": ""},
    )
    assert proc.returncode == 2
    assert "world size 2 is not divisible by TP x PP x CP = 3 x 1 x 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_command_validates_examples():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megamft",
            "check",
            "--config",
            "examples/quickstart.yaml",
            "--world-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=_repo_root(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "valid for world size 2" in proc.stdout


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]

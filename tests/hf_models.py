"""Tiny random Hugging Face models for the conversion tests, and transformers' own forward of them.

Imported after `pytest.importorskip("transformers")`. transformers builds the models and computes the
reference logits; megamft-convert and megamft's forward (multi-process, under `launch`) are what is tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jobs
import torch
import transformers
from safetensors.torch import load_file

from megamft.checkpoint import hf_convert
from megamft.testing.distributed import launch


def tiny_model(config) -> torch.nn.Module:
    """A random fp32 model of `config` (seed 0) whose norms, biases and routers are randomized too:
    transformers starts norms at 1, biases at 0 and routers near 0, which would hide their conversion."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                param.copy_(
                    torch.randn_like(param) * 0.1 + ("norm" in pname and pname.endswith("weight"))
                )
            elif pname.endswith(
                "gate.weight"
            ):  # MoE routers (and Qwen's shared-expert gate): clear choices
                param.copy_(torch.randn_like(param))
    return model


def convert_each(tmp_path_factory, names, save: Callable[[str, Path], Path]) -> dict:
    """name -> (hf folder, megamft folder): each model written by `save(name, folder)`, then converted."""
    out = {}
    for name in names:
        root = tmp_path_factory.mktemp(name)
        hf_dir = save(name, root / "hf")
        hf_convert.hf_to_megatron(hf_dir, root / "megatron")
        out[name] = (hf_dir, root / "megatron")
    return out


def random_tokens(vocab: int, seq: int = 24) -> torch.Tensor:
    """A batch of 2 token sequences, the same on every call."""
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


def hf_logits(folder: Path, batch: torch.Tensor) -> torch.Tensor:
    """transformers' logits of the model saved in `folder` (fp32)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(batch).logits


def megamft_logits(
    checkpoint: Path,
    batch: torch.Tensor,
    world_size: int = 1,
    overrides=(),
    model_yaml: Path | None = None,
) -> torch.Tensor:
    """megamft's logits of a checkpoint, run on `world_size` ranks with these config overrides."""
    model_yaml = model_yaml or checkpoint / "megamft_model.yaml"
    results = launch(
        jobs.converted_logits,
        world_size,
        timeout=180,
        kwargs=dict(
            checkpoint=str(checkpoint),
            model_yaml=str(model_yaml),
            overrides=overrides,
            tokens=batch,
        ),
    )
    return next(r for r in results if r is not None)


def resave(checkpoint: Path, overrides, out_dir: Path, timeout: float = 180) -> None:
    """Load a converted checkpoint on 4 ranks laid out by `overrides` and save it to `out_dir`."""
    launch(
        jobs.resave,
        4,
        timeout=timeout,
        kwargs=dict(
            checkpoint=str(checkpoint),
            model_yaml=str(checkpoint / "megamft_model.yaml"),
            overrides=overrides,
            out_dir=str(out_dir),
        ),
    )


def sharded_tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint saved in shards, read through its model.safetensors.index.json."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors.update(load_file(folder / shard))
    return tensors


def assert_exports_bit_identical(resaved: Path, out_dir: Path, hf_dir: Path, name: str) -> None:
    """A megamft checkpoint converted from `hf_dir` (and resaved at some layout) exports, with `hf_dir` as
    its template, to exactly the tensors `hf_dir` holds: the same names, bit-identical values."""
    exported = hf_convert.megatron_to_hf(resaved, out_dir, hf_template=hf_dir)
    original = load_file(hf_dir / "model.safetensors")
    back = sharded_tensors(exported)
    assert set(back) == set(original), name
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), (name, key)


def assert_export_loads_in_transformers(
    hf_dir: Path, megatron_dir: Path, out_dir: Path, tokens: torch.Tensor
) -> None:
    """Exported without a template (megamft's own config.json), the checkpoint loads in transformers as
    `hf_dir`'s architecture with no missing or unexpected key, and computes `hf_dir`'s logits exactly."""
    exported = hf_convert.megatron_to_hf(megatron_dir, out_dir)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        exported, output_loading_info=True
    )
    assert not any(info.values()), info
    assert (
        type(model).__name__ == json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    )
    torch.testing.assert_close(
        hf_logits(exported, tokens), hf_logits(hf_dir, tokens), rtol=0, atol=0
    )


def parameter_counts(hf_dir: Path) -> tuple[int, int]:
    """(megamft's memory estimator's parameter count of the converted model, the transformers model's)."""
    from megamft.config import MegamftConfig
    from megamft.sizing.memory import stage_parameters

    model = hf_convert.plan_hf_to_megatron(hf_dir)[0]
    ours = stage_parameters(MegamftConfig(model=model), model.vocab_size, first=True, last=True)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return ours, sum(p.numel() for p in hf_model.parameters())

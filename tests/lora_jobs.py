"""LoRA and QLoRA functions that tests run on real processes via megamft.testing.launch."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).parent)
)  # ranks load this file by path; jobs.py lies beside it

from jobs import TINY_MODEL, tiny_config  # noqa: E402


def causal_batch(rows: int, seq: int, vocab: int, seed: int = 3) -> dict:
    """Plain causal rows (no padding, no packing) with random labels: what a Hugging Face forward sees."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq), generator=g)
    return dict(
        tokens=tokens,
        labels=torch.randint(0, vocab, (rows, seq), generator=g),
        loss_mask=torch.ones(rows, seq),
        task_ids=torch.zeros(rows, seq, dtype=torch.long),
        position_ids=torch.arange(seq).expand(rows, seq).contiguous(),
    )


def _state(model_yaml: str | None, overrides: tuple[str, ...], checkpoint: str | None):
    """This rank's training state of a checkpoint's weights (None: the seed's): the model section of
    `model_yaml` (a conversion's), or the tests' tiny model."""
    from megamft.checkpoint import dist_checkpoint
    from megamft.config import load_config
    from megamft.data.tokenizer import ByteTokenizer
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state

    cfg = load_config(
        [model_yaml] if model_yaml else [],
        [
            *([] if model_yaml else TINY_MODEL),
            "train.global_batch_size=2",
            "train.micro_batch_size=1",
            "optimizer.use_distributed_optimizer=false",
            "optimizer.clip_grad=0.0",
            *overrides,
        ],
    )
    cfg.model.vocab_size = (
        cfg.model.vocab_size or ByteTokenizer().vocab_size
    )  # as training fills it in
    runtime = distributed.initialize(cfg)
    state = build_training_state(cfg, runtime, cfg.model.vocab_size)
    if checkpoint is not None:
        dist_checkpoint.load(state, checkpoint, cfg, load_optimizer=False)
    return cfg, state


def logits_and_adapter_grads(
    checkpoint: str, model_yaml: str, overrides: tuple[str, ...], batch: dict, grads_dir: str | None
) -> dict | None:
    """The logits of `batch` at this layout, and (with grads_dir) the adapters' gradients of the token-mean
    cross entropy over it, saved as if they were the adapters (a checkpoint any layout and the exporter read)."""
    import torch
    from megatron.core import parallel_state

    from megamft.checkpoint import dist_checkpoint
    from megamft.model.inference import full_logits
    from megamft.platform import distributed
    from megamft.training.step import LossSetup, train_step

    try:
        cfg, state = _state(model_yaml, overrides, checkpoint)
        logits = full_logits(state.chunks, batch["tokens"])
        keep = logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
        if grads_dir is None:
            return {"logits": logits.cpu()} if keep else None
        rows = batch["tokens"].shape[0]
        micro = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(rows)]
        for chunk in state.chunks:
            chunk.train()
        train_step(state, micro, ("task",), LossSetup(mode="token"))
        with torch.no_grad():
            for chunk in state.chunks:
                for param in chunk.module.parameters():
                    if param.requires_grad:
                        param.copy_(param.main_grad)
        dist_checkpoint.save(state, grads_dir, 0, 0, cfg, with_optimizer=False)
        return {"logits": logits.cpu()} if keep else None
    finally:
        distributed.shutdown()


def quantized_shards(
    checkpoint: str | None, model_yaml: str | None, overrides: tuple[str, ...]
) -> dict:
    """Each LoRA-aware linear's dequantized NF4 weight on this rank (by its seed name), its TP rank, and the
    bytes its base takes with the parameters it stands for."""
    from megatron.core import parallel_state

    from megamft.model.chunks import bare_model
    from megamft.model.lora import lora_modules
    from megamft.platform import distributed

    try:
        _, state = _state(model_yaml, overrides, checkpoint)
        modules = dict(lora_modules(bare_model(state.chunks[0])))
        return {
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "weights": {name: m.dequantized_weight().cpu() for name, m in modules.items()},
            "base_bytes": sum(m.base_nbytes() for m in modules.values()),
            "base_params": sum(m.dequantized_weight().numel() for m in modules.values()),
        }
    finally:
        distributed.shutdown()


def save_weights(
    checkpoint: str,
    model_yaml: str | None,
    overrides: tuple[str, ...],
    out_dir: str,
    merge: bool = False,
) -> None:
    """Load a checkpoint at a layout and save the weights the model computes with: a QLoRA model's base as its
    ranks dequantize it; with `merge`, the adapters merged in (per shard, as merge_lora does)."""
    from megamft.checkpoint import dist_checkpoint
    from megamft.model.chunks import bare_model
    from megamft.model.lora import merge_lora
    from megamft.platform import distributed

    try:
        cfg, state = _state(model_yaml, overrides, checkpoint)
        if merge:
            merge_lora(bare_model(state.chunks[0]))
        dist_checkpoint.save(state, out_dir, 0, 0, cfg, with_optimizer=False)
    finally:
        distributed.shutdown()


def tiny_lora_layer_outputs(cases: list[tuple[float, bool, str]], seed: int) -> list[dict]:
    """For each (dropout, use_rslora, kind): a LoRA-aware megatron linear of one rank (TP=1), its output and
    gradients for a random input in training mode, with its weight, A and B, for a reference to recompute."""
    import torch

    from megamft.config import LoraConfig
    from megamft.model.builder import transformer_config
    from megamft.model.lora import LoraColumnParallelLinear, LoraRowParallelLinear
    from megamft.platform import distributed

    cfg = tiny_config("train.precision=fp32")
    distributed.initialize(cfg)
    results = []
    try:
        config = transformer_config(cfg)
        for dropout, use_rslora, kind in cases:
            lora = LoraConfig(
                enabled=True, rank=4, alpha=8.0, dropout=dropout, use_rslora=use_rslora
            )
            common = dict(
                config=config,
                init_method=torch.nn.init.normal_,
                bias=False,
                skip_bias_add=False,
                lora=lora,
            )
            layer = (
                LoraColumnParallelLinear(24, 40, gather_output=False, **common)
                if kind == "column"
                else LoraRowParallelLinear(24, 40, input_is_parallel=True, **common)
            ).cuda()
            with torch.no_grad():
                layer.lora_A.copy_(
                    torch.randn(layer.lora_A.shape, generator=torch.Generator().manual_seed(1))
                )
                layer.lora_B.copy_(
                    torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(2))
                )
            layer.weight.requires_grad_(False)
            x = (
                torch.randn(5, 2, 24, generator=torch.Generator().manual_seed(4))
                .cuda()
                .requires_grad_()
            )
            layer.train()
            torch.manual_seed(seed)
            out, _ = layer(x)
            out.pow(2).sum().backward()
            results.append(
                {
                    "x": x.detach().cpu(),
                    "out": out.detach().cpu(),
                    "x_grad": x.grad.cpu(),
                    "weight": layer.weight.detach().cpu(),
                    "A": layer.lora_A.detach().cpu(),
                    "B": layer.lora_B.detach().cpu(),
                    "A_grad": layer.lora_A.grad.cpu(),
                    "B_grad": layer.lora_B.grad.cpu(),
                }
            )
        return results
    finally:
        distributed.shutdown()


def te_spec_layer_against_local(overrides: tuple[str, ...]) -> dict:
    """One transformer layer built from the Transformer Engine LoRA spec over stand-ins (te_standins) and one
    from the local LoRA spec, with the same weights: their outputs, adapter gradients and checkpoint keys."""
    import torch
    from megatron.core.transformer.spec_utils import build_module
    from te_standins import STAND_INS

    from megamft.model.builder import transformer_config
    from megamft.model.lora_spec import te_separate_norm_layer_spec
    from megamft.model.spec import local_block_spec
    from megamft.platform import distributed

    cfg = tiny_config(
        "train.precision=fp32",
        "lora.enabled=true",
        "lora.rank=4",
        "lora.targets=[all-linear]",
        *overrides,
    )
    distributed.initialize(cfg)
    try:
        config = transformer_config(cfg)
        te = build_module(
            te_separate_norm_layer_spec(cfg.lora, True, te=STAND_INS), config=config, layer_number=1
        )
        local = build_module(
            local_block_spec(1, lora=cfg.lora, torch_attention=True).layer_specs[0],
            config=config,
            layer_number=1,
        )
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in local.named_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + ("norm" in name))
        te.load_state_dict(local.state_dict(), strict=True)
        hidden = torch.randn(16, 2, cfg.model.hidden_size, generator=generator)
        if cfg.parallel.sequence_parallel:
            from megatron.core import parallel_state

            rank, tp = (
                parallel_state.get_tensor_model_parallel_rank(),
                cfg.parallel.tensor_model_parallel_size,
            )
            hidden = hidden.chunk(tp)[rank]
        outputs, grads = [], []
        for layer in (te, local):
            layer.cuda().train()
            out = layer(hidden.cuda().requires_grad_(), attention_mask=None)[0]
            out.pow(2).sum().backward()
            outputs.append(out.detach().cpu())
            grads.append({n: p.grad.cpu() for n, p in layer.named_parameters() if "lora_" in n})
        keys = [
            sorted(layer.sharded_state_dict(prefix="decoder.layers.0.")) for layer in (te, local)
        ]
        types = {name: type(module).__name__ for name, module in te.named_modules()}
        return {"outputs": outputs, "grads": grads, "keys": keys, "types": types}
    finally:
        distributed.shutdown()


def build_norm_owning_lora_linear() -> None:
    """Building a LoRA linear over TE's LayerNorm + linear (a stand-in) raises: its norm is fused in."""
    import pytest
    from te_standins import TELayerNormColumnParallelLinear

    from megamft.config import LoraConfig
    from megamft.model.builder import transformer_config
    from megamft.model.lora import lora_linear_class
    from megamft.platform import distributed

    cfg = tiny_config()
    distributed.initialize(cfg)
    try:
        cls = lora_linear_class(TELayerNormColumnParallelLinear, "column")
        with pytest.raises(ValueError, match="un-normalized"):
            cls(
                32,
                64,
                config=transformer_config(cfg),
                init_method=lambda w: None,
                gather_output=False,
                bias=False,
                skip_bias_add=False,
                is_expert=False,
                lora=LoraConfig(enabled=True, rank=2),
            )
    finally:
        distributed.shutdown()

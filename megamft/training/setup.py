"""Model, DDP wrapping, optimizer and LR schedule from one config."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megamft.config import MegamftConfig
from megamft.model.builder import build_model_chunks, transformer_config
from megamft.model.fast_settings import FastSetting, fast_settings, machine_for, transformer_fields
from megamft.model.lora import apply_lora
from megamft.model.spec import attention_backend_for
from megamft.model.userbuffers import initialize_userbuffers
from megamft.platform.device import Runtime
from megamft.sizing.vocab import padded_vocab_size

# fp16's first loss scale: megatron's default (2^32) suits a loss averaged over the tokens of a
# micro-batch; megamft's per-token loss (calculate_per_token_loss) backpropagates sums, whose
# gradients are larger by about the tokens of a rank's step, so the scale settles far lower and
# every halving from 2^32 would cost a skipped step. 2^16 is torch.amp's GradScaler default.
_OPTIMIZER_DEFAULTS = {
    "optimizer": "adam",
    "lr": 1e-3,
    "use_distributed_optimizer": True,
    "initial_loss_scale": 2.0**16,
}


@dataclass
class TrainingState:
    """Everything one rank trains with."""

    chunks: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    config: TransformerConfig
    vocab_size: int
    fast_settings: list[FastSetting] = field(default_factory=list)  # what was turned on, and why


def optimizer_config(cfg: MegamftConfig) -> OptimizerConfig:
    fields = {**_OPTIMIZER_DEFAULTS, **cfg.optimizer}
    fields["bf16"] = cfg.train.precision == "bf16"
    fields["fp16"] = cfg.train.precision == "fp16"
    fields["params_dtype"] = (
        torch.float32
        if cfg.train.precision == "fp32"
        else (torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16)
    )
    return OptimizerConfig(**fields)


def ddp_config(cfg: MegamftConfig, opt: OptimizerConfig) -> DistributedDataParallelConfig:
    fields = {"grad_reduce_in_fp32": True, **cfg.ddp}
    fields["use_distributed_optimizer"] = opt.use_distributed_optimizer
    return DistributedDataParallelConfig(**fields)


def _wire_grad_sync(config: TransformerConfig, chunks: list, ddp: DistributedDataParallelConfig):
    """Tell megatron's schedule how to delay and finish gradient reduction."""
    config.finalize_model_grads_func = finalize_model_grads
    if ddp.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync


def build_training_state(
    cfg: MegamftConfig, runtime: Runtime, vocab_size: int, backend: str | None = None
) -> TrainingState:
    """Build this rank's model chunks, wrap them in megatron DDP, make the optimizer.

    backend: the attention backend the caller already resolved (attention_backend_for) or None.
    """
    backend = backend or attention_backend_for(cfg, runtime.transformer_engine)
    fast = fast_settings(cfg, machine_for(runtime.cuda, runtime.transformer_engine, backend))
    config = transformer_config(cfg, transformer_fields(fast))
    initialize_userbuffers(cfg, config)
    padded = padded_vocab_size(
        cfg.model.vocab_size or vocab_size,
        cfg.parallel.tensor_model_parallel_size,
        cfg.model.make_vocab_size_divisible_by,
    )
    modules = build_model_chunks(cfg, config, padded, backend)
    if cfg.lora.enabled:
        for module in modules:
            apply_lora(module, cfg.lora)
    for module in modules:
        # Every parameter and buffer on this rank's GPU, frozen ones included: megatron's
        # DDP moves only trainable parameters (into its gradient buffers).
        module.cuda(torch.cuda.current_device())
    if cfg.train.precision != "fp32":
        # Runs the chunk in bf16/fp16 and hands fp32 logits and losses to the loss function.
        modules = [Float16Module(config, module) for module in modules]
    opt_cfg = optimizer_config(cfg)
    ddp_cfg = ddp_config(cfg, opt_cfg)
    chunks = [
        DistributedDataParallel(config, ddp_cfg, module, disable_bucketing=index > 0)
        for index, module in enumerate(modules)
    ]
    _wire_grad_sync(config, chunks, ddp_cfg)
    optimizer = get_megatron_optimizer(opt_cfg, chunks)
    # megatron's schedule multiplies the loss by this before backward, and the optimizer divides
    # the gradients by the same scale (fp16's dynamic loss scale, 1 otherwise). Without it fp16
    # gradients are divided by a scale that was never applied and vanish.
    config.grad_scale_func = optimizer.scale_loss
    return TrainingState(
        chunks, optimizer, lr_scheduler(cfg, optimizer, opt_cfg), config, padded, fast
    )


def lr_scheduler(cfg: MegamftConfig, optimizer, opt: OptimizerConfig) -> OptimizerParamScheduler:
    """Warm-up then decay, counted in samples as megatron does."""
    batch = cfg.train.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr or 0.0,
        lr_warmup_steps=cfg.train.lr_warmup_steps * batch,
        lr_decay_steps=cfg.train.train_steps * batch,
        lr_decay_style=cfg.train.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=cfg.train.train_steps * batch,
        wd_incr_style="constant",
        # The config is the source of truth: a resumed run may change steps or LRs;
        # only the step count comes back from the checkpoint.
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )

"""Transformer Engine's userbuffers, which its linears use to overlap TP communication with GEMMs."""

from __future__ import annotations

import inspect

from megatron.core.transformer import TransformerConfig

from megamft.config import MegamftConfig


def userbuffer_shape(cfg: MegamftConfig) -> list[int]:
    """The global shape of a layer's input with sequence and batch collapsed: [seq x micro-batch / CP, hidden]."""
    rows = cfg.data.seq_length * cfg.train.micro_batch_size // cfg.parallel.context_parallel_size
    return [rows, cfg.model.hidden_size]


def initialize_userbuffers(cfg: MegamftConfig, config: TransformerConfig) -> bool:
    """Allocate TE's communication buffers once per process, before any TE module is built.

    Contract: transformer_engine/pytorch/module/base.py ``initialize_ub(shape, tp_size,
    use_fp8=False, ..., dtype=..., ub_cfgs=None, bootstrap_backend=None)``, called once
    (it asserts it was not called before) with the 2-D buffer shape; megatron's TE
    linears then find their communicators by name when ``config.tp_comm_overlap`` is on.
    Only keywords that the installed TE accepts are passed. Returns whether it ran.
    """
    if not config.tp_comm_overlap:
        return False
    from transformer_engine.pytorch.module import base

    wanted = {
        "shape": userbuffer_shape(cfg),
        "tp_size": cfg.parallel.tensor_model_parallel_size,
        "use_fp8": bool(config.fp8),
        "dtype": config.params_dtype,
        "bootstrap_backend": "nccl",
    }
    accepted = inspect.signature(base.initialize_ub).parameters
    base.initialize_ub(**{key: value for key, value in wanted.items() if key in accepted})
    return True

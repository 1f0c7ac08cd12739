"""Mixture-of-experts functions that tests run on real processes via megamft.testing.launch."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).parent)
)  # ranks load this file by path; jobs.py lies beside it

from jobs import packed_global_batch, tiny_config  # noqa: E402

MOE_MODEL = (
    "model.num_layers=2",
    "model.num_experts=4",
    "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=32",
    "optimizer.use_distributed_optimizer=false",
)


def _global_name(name: str, ep_rank: int, local_experts: int) -> str:
    """SequentialMLP's local expert index -> the global expert index."""
    return re.sub(
        r"local_experts\.(\d+)\.",
        lambda m: f"local_experts.{ep_rank * local_experts + int(m[1])}.",
        name,
    )


def _grads(state, ep_rank: int, local_experts: int) -> dict:
    return {
        _global_name(n, ep_rank, local_experts): p.main_grad.detach().clone().cpu()
        for n, p in state.chunks[0].module.named_parameters()
    }


def _plain_torch_router_losses(state, batch, coefficients) -> dict:
    """Reference: c_aux x load balancing + c_z x z-loss, per layer, in plain torch, and its gradients.

    Recomputed from each router's input, so only megatron's model (not its loss code) is shared.
    """
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    model = state.chunks[0].module
    inputs = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0])))
        for m in model.modules()
        if isinstance(m, TopKRouter)
    ]
    config = model.config
    saved = config.moe_aux_loss_coeff, config.moe_z_loss_coeff
    config.moe_aux_loss_coeff, config.moe_z_loss_coeff = (
        0.0,
        None,
    )  # megatron adds nothing itself here
    model.train()
    model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    config.moe_aux_loss_coeff, config.moe_z_loss_coeff = saved
    for hook in hooks:
        hook.remove()
    total = 0.0
    for router, hidden in inputs:
        logits = hidden.reshape(-1, hidden.shape[-1]).float() @ router.weight.float().t()
        probs = torch.softmax(logits, dim=-1)
        experts, topk, tokens = logits.shape[1], router.topk, logits.shape[0]
        chosen = torch.zeros_like(probs).scatter(1, logits.topk(topk, dim=-1).indices, 1.0)
        balance = experts / (topk * tokens * tokens) * (chosen.sum(0) * probs.sum(0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        total = total + coefficients[0] * balance + coefficients[1] * z
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return {
        n: (g if g is not None else torch.zeros_like(p)).detach().cpu()
        for (n, p), g in zip(model.named_parameters(), grads)
    }


def aux_gradient(
    weights_dir: str,
    micro_batch_size: int,
    copies: int,
    coefficients: tuple[float, float],
    overrides: tuple[str, ...] = (),
    reference: bool = False,
) -> dict:
    """Gradient of the router losses in one megamft step (step with them minus step without them).

    The global batch is `copies` copies of the same two packed rows (40% of tokens learned),
    so every split into micro-batches and DP ranks sees the same router losses.
    """
    from megatron.core import parallel_state

    from megamft.checkpoint import dist_checkpoint
    from megamft.data.tokenizer import ByteTokenizer
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state
    from megamft.training.step import LossSetup, to_device, train_step

    # No clipping: it would rescale the two steps' gradients by different factors. megatron's local
    # attention: the router-loss gradient is a difference of two steps' gradients, and SDPA's blockwise
    # CPU backward rounds differently for different upstream gradients (noise of ~1e-7 of the task
    # gradient, above this test's tolerance); the router losses' scale does not depend on the backend.
    cfg = tiny_config(
        *MOE_MODEL,
        "model.attention_backend=local",
        f"train.micro_batch_size={micro_batch_size}",
        "optimizer.clip_grad=0.0",
        *overrides,
    )
    runtime = distributed.initialize(cfg)
    try:
        rows = packed_global_batch(rows=2, seq=32)
        batch = {k: v.repeat(copies, *[1] * (v.dim() - 1)) for k, v in rows.items()}
        dp, dp_rank = (
            parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_rank(),
        )
        share = batch["tokens"].shape[0] // dp
        mine = {k: v[dp_rank * share : (dp_rank + 1) * share] for k, v in batch.items()}
        micro = [
            {k: v[i : i + micro_batch_size] for k, v in mine.items()}
            for i in range(0, share, micro_batch_size)
        ]
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        local = cfg.model.num_experts // cfg.parallel.expert_model_parallel_size
        out = {}
        for name, coeffs in (("with", coefficients), ("without", (0.0, 0.0))):
            state = build_training_state(cfg, runtime, ByteTokenizer().vocab_size)
            dist_checkpoint.load(state, weights_dir, cfg, load_optimizer=False)
            stats = train_step(
                state, micro, ("a", "b", "c"), LossSetup("task_token", router_loss_coeffs=coeffs)
            )
            out[name] = {
                "loss": stats.loss,
                "router": stats.router_losses,
                "grads": _grads(state, ep_rank, local),
            }
        out["aux"] = {
            n: out["with"]["grads"][n] - out["without"]["grads"][n] for n in out["with"]["grads"]
        }
        out["ep_rank"] = ep_rank
        if reference:
            state = build_training_state(cfg, runtime, ByteTokenizer().vocab_size)
            dist_checkpoint.load(state, weights_dir, cfg, load_optimizer=False)
            out["reference"] = _plain_torch_router_losses(
                state, to_device(dict(rows)), coefficients
            )
        return out
    finally:
        distributed.shutdown()


def expert_stats_of_one_step(overrides: tuple[str, ...] = ()) -> dict:
    """Expert statistics of one training step, and each router's routing map recorded independently."""
    import jobs
    from megatron.core.transformer.moe.router import TopKRouter

    from megamft.training.expert_stats import ExpertStats
    from megamft.training.step import LossSetup, train_step

    with jobs.tiny_model(*MOE_MODEL, "data.mode=pad", *overrides) as (cfg, data, state):
        stats = ExpertStats(
            state.chunks,
            cfg.model.num_layers,
            len(data.task_names),
            cfg.model.num_experts,
            cfg.parallel.sequence_parallel,
        )
        seen = []
        for module in state.chunks[0].module.modules():
            if isinstance(module, TopKRouter):
                module.register_forward_hook(
                    lambda m, a, out: seen.append((m.layer_number, out[1].detach().cpu()))
                )
        batches = jobs.first_batches(data, 8, 2)
        train_step(
            state,
            batches,
            data.task_names,
            LossSetup("token", router_loss_coeffs=(0.01, 0.0)),
            before_forward=stats.route_tasks,
        )
        counts = stats.read()
        again = stats.read()  # read resets
        return {"counts": counts, "again": again, "seen": seen, "batches": batches}

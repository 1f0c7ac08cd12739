"""Functions that tests run on several real processes via megamft.testing.launch.

Kept out of test modules so that each rank imports only this small file.
"""

from __future__ import annotations

import contextlib

from megamft.config import load_config, validate

TINY_MODEL = [
    "model.num_layers=4",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "data.seq_length=192",
    "data.max_samples_per_task=48",
    "data.valid_samples_per_task=8",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.lr_warmup_steps=1",
    "train.log_interval=1",
    "optimizer.lr=1e-3",
]


def tiny_config(*overrides: str, config_files: tuple[str, ...] = ()):
    """The test model and data, with layout and run overrides.

    With config files, their model section replaces TINY_MODEL's; data/train overrides still apply.
    """
    return (
        load_config(list(config_files), [*TINY_MODEL, *overrides])
        if not config_files
        else load_config(
            list(config_files),
            [o for o in TINY_MODEL if not o.startswith("model.")] + list(overrides),
        )
    )


def first_batches(data, rows: int, micro_batch_size: int) -> list[dict]:
    """The first `rows` training sequences as micro-batches (one DP rank)."""
    return data.batches(data.train_rows(0, rows, 0, 1), micro_batch_size)


@contextlib.contextmanager
def tiny_model(*overrides: str):
    """(cfg, data, training state) of the test model on this rank's process group; torn down after."""
    from megamft.data.dataset import load_data
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state

    cfg = tiny_config(*overrides)
    runtime = distributed.initialize(cfg)
    try:
        data = load_data(cfg.data)
        yield cfg, data, build_training_state(cfg, runtime, data.vocab_size)
    finally:
        distributed.shutdown()


def save_initial_weights(save_dir: str, overrides: tuple[str, ...] = ()) -> None:
    """Build a model from the seed and save it untrained, as iteration 0."""
    from megamft.checkpoint import dist_checkpoint
    from megamft.data.tokenizer import ByteTokenizer
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state

    cfg = tiny_config(*overrides)
    runtime = distributed.initialize(cfg)
    try:
        state = build_training_state(cfg, runtime, ByteTokenizer().vocab_size)
        dist_checkpoint.save(state, save_dir, 0, 0, cfg, with_optimizer=False)
    finally:
        distributed.shutdown()


def train(overrides: tuple[str, ...], config_files: tuple[str, ...] = ()) -> dict:
    """Run the real training recipe; return what the test compares."""
    import os

    from megamft.training.loop import run

    cfg = tiny_config(*overrides, config_files=config_files)
    validate(cfg, int(os.environ["WORLD_SIZE"]))
    result = run(cfg)
    return {
        "loss": [s.loss for s in result.history],
        "grad_norm": [s.grad_norm for s in result.history],
        "task_loss": [s.task_loss for s in result.history],
        "task_weights": [s.task_weights for s in result.history],
        "tokens": [s.tokens for s in result.history],
        "valid_before": result.valid_before.loss,
        "valid_after": result.valid_after.loss,
        "task_samples": result.task_samples,
        "stats": result.history,
        "best": result.best,
        "stopped_early": result.stopped_early,
    }


def loss_against_plain_torch() -> dict:
    """megatron's per-token loss and megamft's reduction vs F.cross_entropy on the logits."""
    import torch
    import torch.nn.functional as F

    from megamft.loss.multitask import task_sums
    from megamft.training.step import to_device

    with tiny_model("data.mode=pad") as (cfg, data, state):  # one task per row
        model = state.chunks[0].module
        batch = to_device(first_batches(data, 6, 6)[0])
        with torch.no_grad():
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            logits = model(batch["tokens"], batch["position_ids"], None)
        reference = F.cross_entropy(
            logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none"
        ).view_as(batch["labels"])
        mask = batch["loss_mask"]
        loss_sum, count = float((per_token * mask).sum()), int(mask.sum())
        stats = {
            "task_stats": torch.cat(
                [
                    task_sums(per_token * mask, batch["task_ids"], 3),
                    task_sums(mask, batch["task_ids"], 3),
                ]
            )
        }
        task_of_row = batch["task_ids"][:, 0]
        return {
            "per_token": per_token.float().cpu(),
            "reference": reference.cpu(),
            "loss_sum": loss_sum,
            "count": count,
            "task_stats": stats["task_stats"].cpu(),
            "mask": mask.cpu(),
            "task_of_row": task_of_row.cpu(),
            "vocab": logits.shape[-1],
        }


def _load_converted(checkpoint: str, model_yaml: str, overrides: tuple[str, ...]):
    """Weights (and any LoRA adapters) of a checkpoint, at the layout the overrides ask for."""
    from megamft.checkpoint import dist_checkpoint
    from megamft.config import load_config
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state

    cfg = load_config(
        [model_yaml], ["train.global_batch_size=2", "train.micro_batch_size=1", *overrides]
    )
    runtime = distributed.initialize(cfg)
    state = build_training_state(cfg, runtime, cfg.model.vocab_size)
    dist_checkpoint.load(state, checkpoint, cfg, load_optimizer=False)
    return cfg, state


def converted_logits(checkpoint: str, model_yaml: str, overrides: tuple[str, ...], tokens):
    """Logits of a converted checkpoint at a layout (from the rank that has them)."""
    from megatron.core import parallel_state

    from megamft.model.inference import full_logits
    from megamft.platform import distributed

    try:
        _, state = _load_converted(checkpoint, model_yaml, overrides)
        logits = full_logits(state.chunks, tokens)
        return logits if parallel_state.get_tensor_model_parallel_rank() == 0 else None
    finally:
        distributed.shutdown()


def resave(checkpoint: str, model_yaml: str, overrides: tuple[str, ...], out_dir: str) -> None:
    """Load a checkpoint at a layout and save it again from that layout."""
    from megamft.checkpoint import dist_checkpoint
    from megamft.platform import distributed

    try:
        cfg, state = _load_converted(checkpoint, model_yaml, overrides)
        dist_checkpoint.save(state, out_dir, 0, 0, cfg, with_optimizer=False)
    finally:
        distributed.shutdown()


def packed_global_batch(
    rows: int = 8, seq: int = 32, vocab: int = 262, num_tasks: int = 3, seed: int = 0
):
    """Rows packing 2-3 documents of different tasks, with block-diagonal causal attention."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    task_ids = torch.zeros(rows, seq, dtype=torch.long)
    sample_ids = torch.zeros(rows, seq, dtype=torch.long)
    positions = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(torch.randperm(seq - 2, generator=g)[: 1 + r % 2].add(1).tolist())
        for doc, (a, b) in enumerate(zip([0, *cuts], [*cuts, seq])):
            sample_ids[r, a:b] = doc
            task_ids[r, a:b] = int(torch.randint(0, num_tasks, (1,), generator=g))
            positions[r, a:b] = torch.arange(b - a)
    loss_mask = (torch.rand(rows, seq, generator=g) > 0.4).float()
    same_doc = sample_ids.unsqueeze(2) == sample_ids.unsqueeze(1)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    attention_mask = ~(same_doc & causal).unsqueeze(1)  # True = masked out
    return dict(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        task_ids=task_ids,
        sample_ids=sample_ids,
        position_ids=positions,
        attention_mask=attention_mask,
    )


def loss_modes_step(
    weights_dir: str,
    micro_batch_size: int,
    modes: tuple[str, ...],
    normalization: str = "global_batch",
) -> dict:
    """One training step per loss mode on the same packed global batch; loss and full gradients."""
    import torch
    from megatron.core import parallel_state

    from megamft.checkpoint import dist_checkpoint
    from megamft.data.tokenizer import ByteTokenizer
    from megamft.loss.balancers import FAMO, CoBa, FocalTaskWeights
    from megamft.loss.multitask import effective_task_weights
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state
    from megamft.training.step import LossSetup, train_step

    world = int(__import__("os").environ["WORLD_SIZE"])
    cfg = tiny_config(
        f"train.micro_batch_size={micro_batch_size}", "optimizer.use_distributed_optimizer=false"
    )
    runtime = distributed.initialize(cfg)
    try:
        batch = packed_global_batch()
        rank, share = parallel_state.get_data_parallel_rank(), 8 // world
        mine = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}
        micro = [
            {k: v[i : i + micro_batch_size] for k, v in mine.items()}
            for i in range(0, share, micro_batch_size)
        ]
        out = {}
        for mode in modes:
            state = build_training_state(cfg, runtime, ByteTokenizer().vocab_size)
            dist_checkpoint.load(state, weights_dir, cfg, load_optimizer=False)
            balancer = {
                "focal": FocalTaskWeights(3, 2.0),
                "coba": CoBa(3, warmup=2),
                "famo": FAMO(3),
            }.get(mode)
            if isinstance(balancer, CoBa):
                balancer.set_normalizer(
                    torch.tensor([1.2, 2.1, 3.3])
                )  # the evaluation before step 0
            for step, losses in enumerate(
                ([1.0, 2.0, 3.0], [0.5, 1.9, 2.0], [0.3, 1.8, 1.2]), start=1
            ):
                if balancer is not None:
                    balancer.before_step(step)
                    balancer.after_train_step(step, torch.tensor(losses))
                    balancer.observe_validation(step, torch.tensor(losses))
            if balancer is not None:
                balancer.before_step(
                    4
                )  # CoBa: past its warm-up, weights from the three measurements
            weights = effective_task_weights(mode, 3, torch.tensor([1.0, 2.0, 0.5]), balancer)
            stats = train_step(
                state, micro, ("a", "b", "c"), LossSetup(mode, normalization, weights, 2.0)
            )
            grads = torch.cat(
                [
                    p.main_grad.detach().flatten().clone()
                    for _, p in sorted(state.chunks[0].module.named_parameters())
                ]
            )
            out[mode] = {
                "loss": stats.loss,
                "grad_norm": stats.grad_norm,
                "grads": grads,
                "weights": weights,
                "per_token": None,
            }
        return out
    finally:
        distributed.shutdown()


def counted_training_flops(overrides: tuple[str, ...] = ()) -> dict:
    """FLOPs per token that torch counts for one forward + backward of the tiny model, model_flops' figure,
    and the shapes the test needs to add the scores local attention computes beyond the causal ones."""
    from torch.utils.flop_counter import FlopCounterMode

    from megamft.sizing.architecture import query_width
    from megamft.sizing.flops import model_flops
    from megamft.training.step import to_device

    with tiny_model("data.seq_length=128", *overrides) as (cfg, data, state):
        model = state.chunks[0].module
        batch = to_device(first_batches(data, 4, 4)[0])
        with FlopCounterMode(display=False) as counter:
            loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum()
            loss.backward()
        rows, seq = batch["tokens"].shape
        return {
            "counted": counter.get_total_flops() / batch["tokens"].numel(),
            "model_flops": model_flops(cfg, state.vocab_size, [seq] * rows) / (rows * seq),
            "rows": rows,
            "seq": seq,
            "layers": cfg.model.num_layers,
            "query_width": query_width(cfg.model),
        }


def measured_memory(overrides: tuple[str, ...]) -> dict:
    """Bytes this rank really holds (weights, grad buffers, Adam state) and saves for backward."""
    import torch

    from megamft.sizing.memory import estimate
    from megamft.training.step import to_device, train_step

    with tiny_model("data.seq_length=128", *overrides) as (cfg, data, state):
        batches = first_batches(data, 8, cfg.train.micro_batch_size)
        train_step(state, batches, data.task_names)
        params = [p for chunk in state.chunks for p in chunk.module.parameters()]
        weights = sum(p.numel() * p.element_size() for p in params)
        # QLoRA's NF4 base is buffers (codes and statistics), not parameters
        nf4 = [
            m
            for chunk in state.chunks
            for m in chunk.modules()
            if getattr(m, "weight_nf4", None) is not None
        ]
        weights += sum(m.base_nbytes() for m in nf4)
        grads = sum(
            p.main_grad.numel() * p.main_grad.element_size()
            for p in params
            if hasattr(p, "main_grad")
        )
        inner = [opt.optimizer for opt in state.optimizer.chained_optimizers]
        optimizer = sum(
            t.numel() * t.element_size()
            for o in inner
            for s in o.state.values()
            for k, t in s.items()
            if torch.is_tensor(t) and k != "step"
        )
        # 16-bit training: the fp32 master copies (megatron's distributed optimizer keeps this rank's shard)
        masters = [
            p
            for o in state.optimizer.chained_optimizers
            for groups in (
                getattr(o, "shard_fp32_from_float16_groups", None)
                or getattr(o, "fp32_from_float16_groups", None)
                or []
            )
            for group in groups
            for p in group
        ]
        optimizer += sum(p.numel() * p.element_size() for p in masters)
        param_storages = {p.untyped_storage().data_ptr() for p in params}
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in param_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        batch = to_device(batches[0])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            state.chunks[0].module(
                batch["tokens"], batch["position_ids"], None, labels=batch["labels"]
            )
        world = torch.distributed.get_world_size()
        want = estimate(cfg, world, data.vocab_size)
        return {
            "weights": (weights, want.weights),
            "gradients": (grads, want.gradients),
            "optimizer": (optimizer, want.optimizer),
            "activations": (sum(saved.values()), want.activations),
        }


def lora_checks(overrides: tuple[str, ...], weights_dir: str) -> dict:
    """Adapter model vs merged model logits; what a LoRA training step changes; optimizer contents."""
    import torch

    from megamft.checkpoint import dist_checkpoint
    from megamft.model.inference import full_logits
    from megamft.model.lora import merge_lora
    from megamft.training.step import train_step

    with tiny_model("lora.enabled=true", "lora.rank=4", *overrides) as (cfg, data, state):
        dist_checkpoint.load(state, weights_dir, cfg, load_optimizer=False)
        model = state.chunks[0].module
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        optimizer_params = sum(
            p.numel()
            for o in state.optimizer.chained_optimizers
            for g in o.optimizer.param_groups
            for p in g["params"]
        )
        for _ in range(2):
            train_step(state, first_batches(data, 8, 2), data.task_names)
        changed = sorted(
            n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])
        )
        tokens = first_batches(data, 2, 2)[0]["tokens"][:, :64]
        with_adapters = full_logits(state.chunks, tokens)
        merge_lora(model)
        merged = full_logits(state.chunks, tokens)
        return {
            "trainable": trainable,
            "changed": changed,
            "optimizer_params": optimizer_params,
            "adapter_params": sum(p.numel() for n, p in before.items() if "lora_" in n),
            "with_adapters": with_adapters,
            "merged": merged,
        }


def packed_isolation() -> dict:
    """Per-token losses of packed sequences vs each of their documents run alone (and vs no mask)."""
    import torch

    from megamft.data.sequences import collate
    from megamft.training.step import to_device

    with tiny_model("data.mode=pack", "data.seq_length=512") as (cfg, data, state):
        model = state.chunks[0].module
        model.eval()
        rows = [row for row in data.train_rows(0, 16, 0, 1) if len(row[0]) >= 2][:3]
        packed = to_device(collate(rows, data.stores, "pack", cfg.data.seq_length, data.pad_id))
        with torch.no_grad():
            together = model(
                packed["tokens"],
                packed["position_ids"],
                packed["attention_mask"],
                labels=packed["labels"],
            )
            positions = torch.arange(cfg.data.seq_length, device="cuda").expand_as(packed["tokens"])
            plain = model(packed["tokens"], positions, None, labels=packed["labels"])
        (max_diff, unmasked_max_diff), documents = max_diffs_to_documents_alone(
            model, data, rows, together, plain
        )
        return {
            "max_diff": max_diff,
            "unmasked_max_diff": unmasked_max_diff,
            "documents": documents,
        }


def max_diffs_to_documents_alone(
    model, data, rows: list, *packed_losses
) -> tuple[list[float], int]:
    """For each per-token loss tensor of the packed `rows`: the largest |difference| from the losses of
    each of its documents run alone (padded to its own length); and the number of documents."""
    import torch

    from megamft.data.sequences import collate
    from megamft.training.step import to_device

    diffs, documents = [[] for _ in packed_losses], 0
    with torch.no_grad():
        for r, (tasks, docs) in enumerate(rows):
            at = 0
            for k in range(len(docs)):
                n = int(data.stores[tasks[k]].lengths[docs[k]]) - 1
                alone = to_device(
                    collate(
                        [(tasks[k : k + 1], docs[k : k + 1])], data.stores, "pad", n, data.pad_id
                    )
                )
                loss = model(alone["tokens"], alone["position_ids"], None, labels=alone["labels"])[
                    0
                ]
                for found, packed in zip(diffs, packed_losses):
                    found.append(float((packed[r, at : at + n] - loss).abs().max()))
                at += n
                documents += 1
    return [max(found) for found in diffs], documents


def context_parallel_objective(context_parallel: int, modes: tuple[str, ...]) -> dict:
    """Σ w·l of the first global batch per loss mode, each CP rank summing only its share of the tokens.

    l is a fixed function of token and position (no model: megatron's CP attention needs
    Transformer Engine); what is checked is megamft's weighting and megatron's split.
    """
    import torch
    from megatron.core import parallel_state

    from megamft.data.dataset import load_data
    from megamft.platform import distributed
    from megamft.training.step import LossSetup, prepare

    cfg = tiny_config("data.mode=pad", f"parallel.context_parallel_size={context_parallel}")
    distributed.initialize(cfg)
    try:
        data = load_data(cfg.data)
        batches = first_batches(data, 8, 2)
        out = {}
        for mode in modes:
            setup = LossSetup(
                mode=mode, task_weights=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
            )
            total = torch.zeros((), dtype=torch.float64, device="cuda")
            for batch in prepare(batches, setup, 3)[0]:
                fake_loss = ((batch["tokens"] * 31 + batch["position_ids"] * 7) % 97).double() / 97
                total += (fake_loss * batch["token_weights"]).sum().cuda()
            torch.distributed.all_reduce(total, group=parallel_state.get_context_parallel_group())
            out[mode] = float(total)
        out["local_tokens"] = sum(b["tokens"].numel() for b in prepare(batches, LossSetup(), 3)[0])
        return out
    finally:
        distributed.shutdown()


def loss_step_memory(
    fused: bool, upcast_logits: bool, vocab: int, tokens_per_micro_batch: int
) -> dict:
    """Emulated device memory that one bf16 training step adds above what the model already holds.

    upcast_logits=True plants the old behaviour: Float16Module's fp32 copy of the logits.
    """
    import torch

    from megamft.training import step as step_module
    from megamft.training.step import LossSetup, train_step

    if (
        upcast_logits
    ):  # the isinstance check then never matches: fp32_output keeps its default, True
        step_module.Float16Module = type("NotFloat16Module", (), {})
    seq = 128
    overrides = (
        "train.precision=bf16",
        f"model.vocab_size={vocab}",
        f"data.seq_length={seq}",
        "data.mode=pad",
        f"train.micro_batch_size={tokens_per_micro_batch // seq}",
    )
    with tiny_model(*overrides) as (cfg, data, state):
        batches = first_batches(data, tokens_per_micro_batch // seq, tokens_per_micro_batch // seq)
        setup = LossSetup(mode="token", fused=fused)
        train_step(state, batches, data.task_names, setup)  # optimizer state exists from here on
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        stats = train_step(state, batches, data.task_names, setup)
        return {
            "added": torch.cuda.max_memory_allocated() - before,
            "loss": stats.loss,
            "padded_vocab": state.vocab_size,
        }


def device_syncs_per_step(overrides: tuple[str, ...]) -> list[int]:
    """Device-to-host synchronizations the strict emulation counted in each training step."""
    return [
        s.device_syncs
        for s in train(("train.train_steps=3", "train.eval_interval=0", *overrides))["stats"]
    ]


def converted_logits_of_each(
    checkpoints: list[tuple[str, str]], overrides: tuple[str, ...], tokens: list
):
    """converted_logits for several checkpoints in one launch (one process group, one layout)."""
    return _logits_of_each(checkpoints, overrides, tokens, out_dirs=None)


def resave_each(
    checkpoints: list[tuple[str, str]],
    overrides: tuple[str, ...],
    out_dirs: list[str],
    tokens: list,
):
    """resave for several checkpoints in one launch; also returns each one's logits at that layout."""
    return _logits_of_each(checkpoints, overrides, tokens, out_dirs)


def _logits_of_each(checkpoints, overrides, tokens, out_dirs: list[str] | None):
    """Each checkpoint's logits at this layout (TP rank 0 of the last stage); saved again to out_dirs if given."""
    from megatron.core import parallel_state

    from megamft.checkpoint import dist_checkpoint
    from megamft.config import load_config
    from megamft.model.inference import full_logits
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state

    runtime, results = None, []
    try:
        for i, ((checkpoint, model_yaml), case_tokens) in enumerate(zip(checkpoints, tokens)):
            cfg = load_config(
                [model_yaml], ["train.global_batch_size=2", "train.micro_batch_size=1", *overrides]
            )
            runtime = runtime or distributed.initialize(cfg)
            state = build_training_state(cfg, runtime, cfg.model.vocab_size)
            dist_checkpoint.load(state, checkpoint, cfg, load_optimizer=False)
            logits = full_logits(state.chunks, case_tokens)
            keep = logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
            results.append(logits.cpu() if keep else None)
            if out_dirs is not None:
                dist_checkpoint.save(state, out_dirs[i], 0, 0, cfg, with_optimizer=False)
    finally:
        distributed.shutdown()
    return results if any(r is not None for r in results) else None


def collective_timeouts(minutes: float) -> dict | None:
    """How long rank 0 waits in a collective on each kind of group, rank 1 never joining, before it fails.

    Returns {group: (seconds waited, error text)} on rank 0. Rank 1 stays alive past every wait, so
    what ends each one is the timeout, not a closed connection.
    """
    import time

    import torch
    from megatron.core import parallel_state

    from megamft.platform import distributed

    distributed.initialize(tiny_config(f"parallel.distributed_timeout_minutes={minutes}"))
    groups = {
        "world": (None, "cuda"),
        "data_parallel": (parallel_state.get_data_parallel_group(), "cuda"),
        "host": (distributed.host_group(), "cpu"),
    }
    if torch.distributed.get_rank() == 1:
        time.sleep(len(groups) * minutes * 60 + 5)
        return None
    waited = {}
    for name, (group, device) in groups.items():
        start = time.monotonic()
        try:
            torch.distributed.all_reduce(torch.zeros(1, device=device), group=group)
            waited[name] = (time.monotonic() - start, "completed")
        except RuntimeError as err:
            waited[name] = (time.monotonic() - start, str(err)[:300])
    return waited

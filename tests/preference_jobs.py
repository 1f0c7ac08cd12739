"""Preference training steps run on real megatron-core ranks via megamft.testing.launch."""

from __future__ import annotations

from jobs import tiny_config

PAIRS, TASKS = 8, ("a", "b")


def synthetic_pairs(seed: int = 0):
    """Two tasks of in-memory pairs (documents 2k, 2k+1 share a prompt; answers differ), and the pair list."""
    import numpy as np

    from megamft.data.dataset import InMemoryDocuments

    rng = np.random.default_rng(seed)
    stores = []
    for _ in TASKS:
        ids, masks = [], []
        for k in range(PAIRS // 2):
            prompt = rng.integers(3, 250, 5 + k % 3)
            for answer_length in (4 + k % 3, 7 - k % 2):
                answer = rng.integers(3, 250, answer_length)
                ids.append(np.concatenate([prompt, answer]).astype(np.int32))
                masks.append(np.r_[np.zeros(len(prompt)), np.ones(answer_length)].astype(np.uint8))
        stores.append(InMemoryDocuments(ids, masks))
    pairs = [(task, k) for k in range(PAIRS // 2) for task in range(len(TASKS))]
    return stores, pairs


def preference_step(
    weights_dir: str,
    pairs_per_micro_batch: int,
    objective: str,
    steps: int = 1,
    layout: tuple[str, ...] = (),
    fused: bool = False,
    length: int = 16,
    packed_attention: str | None = None,
) -> dict:
    """`steps` training steps of `objective` on the synthetic pairs, the reference computed first at this layout;
    `fused`: the answers' log-probabilities from the fused cross entropy's per-sample sums; `packed_attention`
    ('mask' or 'rows', the layout's attention backend's): the pairs packed into rows of `length`."""
    import torch
    from megatron.core import parallel_state

    from megamft.checkpoint import dist_checkpoint
    from megamft.data.pairs import (
        packed_pair_micro_batch,
        pair_micro_batch,
        split_pairs,
        step_rows,
    )
    from megamft.data.tokenizer import ByteTokenizer
    from megamft.loss.preference import PreferenceSetup
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state
    from megamft.training.step import LossSetup, reference_logps, train_step

    cfg = tiny_config(
        f"train.micro_batch_size={2 * pairs_per_micro_batch}",
        f"train.global_batch_size={2 * PAIRS}",
        "optimizer.use_distributed_optimizer=false",
        f"loss.objective={objective}",
        *layout,
    )
    runtime = distributed.initialize(cfg)
    try:
        stores, pairs = synthetic_pairs()
        cuts = split_pairs(
            pairs,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            pairs_per_micro_batch,
        )
        if packed_attention is None:
            micro = [pair_micro_batch(cut, stores, length, 0) for cut in cuts]
        else:
            size = parallel_state.get_data_parallel_world_size()
            rows = step_rows(pairs, stores, length, size, pairs_per_micro_batch)
            micro = [
                packed_pair_micro_batch(cut, stores, length, 0, packed_attention, rows)
                for cut in cuts
            ]
        state = build_training_state(cfg, runtime, ByteTokenizer().vocab_size)
        dist_checkpoint.load(state, weights_dir, cfg, load_optimizer=False)
        for batch, ref in zip(micro, reference_logps(state, micro, len(TASKS), fused)):
            batch["ref_logps"] = ref
        setup = LossSetup(
            "task_token",
            task_weights=torch.tensor([1.0, 3.0]),
            fused=fused,
            preference=PreferenceSetup(objective, beta=0.5),
        )
        history = []
        for _ in range(steps):
            stats = train_step(state, micro, TASKS, setup)
            if not history:
                grads = torch.cat(
                    [
                        p.main_grad.detach().flatten().clone()
                        for _, p in sorted(state.chunks[0].module.named_parameters())
                    ]
                )
            history.append(stats)
        return {
            "rows": [b["tokens"].shape[0] for b in micro],
            "loss": [s.loss for s in history],
            "grad_norm": history[0].grad_norm,
            "grads": grads,
            "metrics": [s.preference for s in history],
        }
    finally:
        distributed.shutdown()


def reference_tables(weights_dir: str, lora: bool = False, steps: int = 3) -> dict:
    """The reference table (reference_logps.compute) at this layout; one pair by full logits; with LoRA, after
    `steps` DPO steps, the table with adapters off and on."""
    import torch
    from megatron.core import parallel_state

    from megamft.checkpoint import dist_checkpoint
    from megamft.data.pairs import pair_micro_batch, split_pairs
    from megamft.data.tokenizer import ByteTokenizer
    from megamft.loss.preference import PreferenceSetup
    from megamft.model.inference import full_logits
    from megamft.platform import distributed
    from megamft.training import reference_logps
    from megamft.training.setup import build_training_state
    from megamft.training.step import LossSetup, train_step

    extra = ("lora.enabled=true", "lora.rank=4", "optimizer.lr=1e-2") if lora else ()
    cfg = tiny_config(
        "train.micro_batch_size=2",
        f"train.global_batch_size={2 * PAIRS}",
        "loss.objective=dpo",
        "optimizer.use_distributed_optimizer=false",
        *extra,
    )
    runtime = distributed.initialize(cfg)
    try:
        stores, pairs = synthetic_pairs()
        state = build_training_state(cfg, runtime, ByteTokenizer().vocab_size)
        dist_checkpoint.load(state, weights_dir, cfg, load_optimizer=False)
        make = lambda cut: pair_micro_batch(cut, stores, 16, 0)  # noqa: E731
        per_task = [PAIRS // 2] * len(TASKS)
        table = lambda: reference_logps.compute(state, pairs, per_task, make, 3)  # noqa: E731
        out = {"start": table()}
        batch = make([pairs[0]])
        logp = torch.log_softmax(full_logits(state.chunks, batch["tokens"]).cpu().double(), dim=-1)
        picked = logp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1) * batch["loss_mask"]
        out["by_logits"] = picked.sum(dim=1)
        if lora:
            cuts = split_pairs(
                pairs,
                parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size(),
                1,
            )
            micro = [make(cut) for cut in cuts]
            start = out["start"]
            for batch, cut in zip(micro, cuts):
                batch["ref_logps"] = torch.tensor([start[task][pair] for task, pair in cut])
            setup = LossSetup("token", preference=PreferenceSetup("dpo", beta=0.5))
            out["losses"] = [train_step(state, micro, TASKS, setup).loss for _ in range(steps)]
            with reference_logps.adapters_disabled(state.chunks[0].module):
                out["adapters_off"] = table()
            out["adapters_on"] = table()
        return out
    finally:
        distributed.shutdown()


def rule_pairs(count: int, seed: int):
    """Pairs whose chosen answer draws its tokens from 100-149 and the rejected one from 150-199."""
    import numpy as np

    from megamft.data.dataset import InMemoryDocuments

    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for k in range(count):
        prompt = rng.integers(3, 100, 4 + k % 4)
        for low in (100, 150):
            answer = rng.integers(low, low + 50, 4 + k % 3)
            ids.append(np.concatenate([prompt, answer]).astype(np.int32))
            masks.append(np.r_[np.zeros(len(prompt)), np.ones(len(answer))].astype(np.uint8))
    return InMemoryDocuments(ids, masks)


def preference_learning(
    weights_dir: str, objective: str, steps: int, train_pairs: int = 64, held_out: int = 32
) -> dict:
    """Train `objective` on rule pairs; preference accuracy on held-out pairs before and after.

    Accuracy: the fraction of held-out pairs whose chosen answer gains more log-probability relative to the
    starting model than the rejected one (DPO's implicit reward, b x log ratio); ties count as wrong.
    """
    import numpy as np
    import torch

    from megamft.checkpoint import dist_checkpoint
    from megamft.data.pairs import pair_micro_batch
    from megamft.data.tokenizer import ByteTokenizer
    from megamft.loss.preference import PreferenceSetup
    from megamft.platform import distributed
    from megamft.training import reference_logps
    from megamft.training.setup import build_training_state
    from megamft.training.step import LossSetup, train_step

    per_step = 8
    cfg = tiny_config(
        "train.micro_batch_size=16",
        f"train.global_batch_size={2 * per_step}",
        f"train.train_steps={steps}",
        "optimizer.lr=3e-3",
        "optimizer.use_distributed_optimizer=false",
        f"loss.objective={objective}",
    )
    runtime = distributed.initialize(cfg)
    try:
        stores = [rule_pairs(train_pairs, 1), rule_pairs(held_out, 2)]
        state = build_training_state(cfg, runtime, ByteTokenizer().vocab_size)
        dist_checkpoint.load(state, weights_dir, cfg, load_optimizer=False)
        make = lambda cut: pair_micro_batch(cut, stores, 16, 0)  # noqa: E731

        def table(task: int, count: int) -> np.ndarray:
            pairs = [(task, k) for k in range(count)]
            return reference_logps.compute(state, pairs, [train_pairs, held_out], make, 16)[task]

        reference = table(0, train_pairs)
        held_reference = table(1, held_out)
        setup = LossSetup("token", preference=PreferenceSetup(objective, beta=0.1))
        losses = []
        for step in range(steps):
            cut = [(0, (step * per_step + k) % train_pairs) for k in range(per_step)]
            batch = make(cut)
            batch["ref_logps"] = torch.tensor(np.stack([reference[pair] for _, pair in cut]))
            losses.append(train_step(state, [batch], ("rule",), setup).loss)
        after = table(1, held_out)
        gain = after - held_reference
        return {"losses": losses, "accuracy": float(np.mean(gain[:, 0] > gain[:, 1]))}
    finally:
        distributed.shutdown()

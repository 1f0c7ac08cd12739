"""Pair micro-batches and the pair schedule: halves together, validation pairs held out, resumable order."""

import numpy as np
import pytest
import torch

from megamft.data.dataset import InMemoryDocuments
from megamft.data.pairs import (
    PairSchedule,
    packed_pair_micro_batch,
    pair_micro_batch,
    split_pairs,
    step_rows,
)


def test_a_micro_batch_holds_both_halves_of_each_pair_with_their_answers():
    ids = [np.arange(10, 10 + n, dtype=np.int32) for n in (5, 6, 4, 7)]
    masks = [np.r_[np.zeros(2), np.ones(len(i) - 2)].astype(np.uint8) for i in ids]
    batch = pair_micro_batch([(0, 1), (0, 0)], [InMemoryDocuments(ids, masks)], 8, 0)
    assert batch["tokens"][:, :3].tolist() == [
        [10, 11, 12],
        [10, 11, 12],
        [10, 11, 12],
        [10, 11, 12],
    ]
    lengths = (~batch["padding"]).sum(1).tolist()
    assert lengths == [3, 6, 4, 5]  # documents 2, 3, 0, 1, each minus its last token
    assert batch["pair_ids"][:, 0].tolist() == [0, 0, 1, 1] and batch["pair_half"][
        :, 0
    ].tolist() == [0, 1, 0, 1]
    assert (batch["pair_half"][batch["padding"]] == -1).all()
    assert batch["loss_mask"].sum(1).tolist() == [2, 5, 3, 4]


def _unequal_pairs():
    """Six pairs whose answers differ widely in length (documents of 4 to 40 tokens)."""
    rng = np.random.default_rng(1)
    lengths = [40, 5, 6, 33, 12, 4, 25, 25, 8, 17, 30, 9]
    ids = [rng.integers(3, 250, n).astype(np.int32) for n in lengths]
    masks = [np.r_[np.zeros(2), np.ones(n - 2)].astype(np.uint8) for n in lengths]
    return [InMemoryDocuments(ids, masks)], [(0, k) for k in range(6)], ids


@pytest.mark.parametrize("attention", ["mask", "rows"])
def test_packed_pairs_fill_fewer_rows_each_document_whole_and_isolated(attention):
    """Against the documents themselves: each sits whole in one row, its positions restarting at 0, with its
    own pair and half; the backend's boundaries (dense mask or RowDocuments) let a token see exactly the
    earlier tokens of its own document."""
    stores, pairs, ids = _unequal_pairs()
    batch = packed_pair_micro_batch(pairs, stores, 48, 0, attention)
    padded = pair_micro_batch(pairs, stores, 48, 0)
    rows = -(-sum(len(doc) - 1 for doc in ids) // 48)  # the fewest rows that hold the positions: 5
    assert batch["tokens"].shape[0] == rows < padded["tokens"].shape[0] == 12
    spans = {}  # (row, start, end) of each document, found from its tokens' pair and half
    for r in range(rows):
        for t in range(48):
            half = int(batch["pair_half"][r, t])
            if half >= 0:
                key = (int(batch["pair_ids"][r, t]), half)
                row, start, _ = spans.get(key, (r, t, t))
                assert row == r, f"document {key} crosses rows"
                spans[key] = (r, start, t + 1)
    assert len(spans) == 12
    owner = torch.full((rows, 48), -1)
    for (pair, half), (r, start, end) in spans.items():
        doc = ids[2 * pairs[pair][1] + half]
        assert end - start == len(doc) - 1
        assert batch["tokens"][r, start:end].tolist() == doc[:-1].tolist()
        assert batch["labels"][r, start:end].tolist() == doc[1:].tolist()
        assert batch["position_ids"][r, start:end].tolist() == list(range(end - start))
        assert batch["loss_mask"][r, start:end].sum() == padded["loss_mask"][2 * pair + half].sum()
        owner[r, start:end] = 2 * pair + half
    if attention == "mask":
        blocked = batch["attention_mask"][:, 0]
    else:  # RowDocuments: cu_seqlens over the flattened rows, a cut at every row start
        cu = batch["packed_seq_params"].cu_seqlens_q.tolist()
        block = torch.zeros(rows * 48, dtype=torch.long)
        for k, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            block[a:b] = k
        block = block.view(rows, 48)
        causal = torch.ones(48, 48, dtype=torch.bool).tril()
        blocked = ~((block.unsqueeze(2) == block.unsqueeze(1)) & causal)
    for r in range(rows):
        real = owner[r] >= 0
        same = (owner[r].unsqueeze(1) == owner[r].unsqueeze(0)) & torch.ones(48, 48).tril().bool()
        seen = ~blocked[r]
        assert torch.equal(seen[real][:, real], same[real][:, real])
        assert not seen[real][:, ~real].any() and not seen[~real][:, real].any()


def test_packed_micro_batches_of_a_step_share_the_fullest_ones_rows():
    """step_rows: the most rows any micro-batch of the global batch needs, on any DP rank; the others get
    empty rows (padding, no pair) and still hold both halves of each of their pairs."""
    from megamft.training.preference_step import pair_samples

    stores, pairs, _ = _unequal_pairs()
    pairs = [pairs[0], pairs[1], pairs[2], pairs[4]]  # 39+4+5+32 positions, then 11+3+7+16
    needs = [
        packed_pair_micro_batch(cut, stores, 48, 0, "mask")["tokens"].shape[0]
        for cut in (pairs[:2], pairs[2:])
    ]
    assert needs == [2, 1]
    assert step_rows(pairs, stores, 48, 2, 2) == 2  # rank 0's micro-batch
    assert step_rows(pairs, stores, 48, 1, 2) == 2
    assert step_rows(pairs, stores, 48, 2, 1) == 1  # one pair each
    small = packed_pair_micro_batch(pairs[2:], stores, 48, 0, "mask", rows=2)
    assert small["tokens"].shape[0] == 2 and small["padding"][1].all()
    assert (small["pair_half"][1] == -1).all() and small["loss_mask"][1].sum() == 0
    from megamft.loss.multitask import sample_index

    index, count = sample_index(small["sample_ids"], small["loss_mask"].shape)
    chosen, rejected, _ = pair_samples(small, index.view(2, 48), count)
    learned = torch.zeros(count).index_add_(0, index, small["loss_mask"].reshape(-1))
    answers = [[float(stores[0].get(2 * k + h)[1][1:].sum()) for _, k in pairs[2:]] for h in (0, 1)]
    assert learned[chosen].tolist() == answers[0] and learned[rejected].tolist() == answers[1]
    with pytest.raises(ValueError, match="need 2 packed rows, more than 1"):
        packed_pair_micro_batch(pairs[:2], stores, 48, 0, "mask", rows=1)


def test_the_schedule_holds_out_validation_pairs_and_covers_each_training_pair_once_an_epoch():
    schedule = PairSchedule([10, 7], valid_per_task=2, pairs_per_step=4, seed=3)
    assert len(schedule.valid) == 4 and not set(schedule.valid) & set(schedule.train)
    epoch = [
        pair for step in range(3) for pair in schedule.step(step)
    ]  # 13 training pairs: 3 steps of 4
    assert len(set(epoch)) == 12 and set(epoch) <= set(schedule.train)
    resumed = PairSchedule([10, 7], valid_per_task=2, pairs_per_step=4, seed=3)
    assert [resumed.step(s) for s in (5, 1, 4)] == [schedule.step(s) for s in (5, 1, 4)]
    assert schedule.step(3) != schedule.step(0)  # a new epoch, a new order


def test_dp_ranks_split_a_global_batch_into_whole_pairs():
    pairs = [(0, k) for k in range(8)]
    shares = [split_pairs(pairs, rank, 2, 2) for rank in range(2)]
    assert [p for share in shares for cut in share for p in cut] == pairs
    assert all(len(cut) == 2 for share in shares for cut in share)
    with pytest.raises(ValueError, match="6 pairs do not fill 2 ranks x micro-batches of 2"):
        split_pairs(pairs[:6], 0, 2, 2)

"""Pair micro-batches and the pair schedule: halves together, validation pairs held out, resumable order."""

import numpy as np
import pytest

from megamft.data.dataset import InMemoryDocuments
from megamft.data.pairs import PairSchedule, pair_micro_batch, split_pairs


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

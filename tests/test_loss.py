"""The training loss equals a plain torch formula on the model's own logits."""

import torch

from megamft.loss.token_loss import masked_token_loss, task_sums
from megamft.testing.distributed import launch

import jobs


def test_megatron_loss_and_reduction_match_plain_cross_entropy():
    out = launch(jobs.loss_against_plain_torch, world_size=1, timeout=180)[0]
    assert out["vocab"] == 384  # 262 byte-level tokens padded to a multiple of 128
    torch.testing.assert_close(out["per_token"], out["reference"], rtol=1e-5, atol=1e-5)
    mask = out["mask"]
    assert out["count"] == int(mask.sum()) > 0
    expected_sum = float((out["reference"] * mask).sum())
    assert abs(out["loss_sum"] - expected_sum) <= 1e-4 * abs(expected_sum)
    for task in range(3):
        rows = out["task_of_row"] == task
        task_sum = float((out["reference"][rows] * mask[rows]).sum())
        task_tokens = float(mask[rows].sum())
        assert abs(float(out["task_stats"][task]) - task_sum) <= 1e-4 * max(abs(task_sum), 1.0)
        assert float(out["task_stats"][3 + task]) == task_tokens


def test_masked_loss_on_a_hand_computed_batch():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    tasks = torch.tensor([[0, 0, 0], [2, 2, 2]])
    loss_sum, count, stats = masked_token_loss(per_token, mask, tasks, num_tasks=3)
    assert float(loss_sum.detach()) == 1 + 3 + 5 + 6 and int(count) == 4
    assert stats["task_stats"].tolist() == [4.0, 0.0, 11.0, 2.0, 0.0, 2.0]
    loss_sum.backward()
    assert torch.equal(per_token.grad, mask)  # masked tokens get no gradient


def test_task_sums_handles_absent_tasks():
    values = torch.tensor([1.0, 2.0, 3.0])
    assert task_sums(values, torch.tensor([1, 1, 3]), 5).tolist() == [0.0, 3.0, 0.0, 3.0, 0.0]

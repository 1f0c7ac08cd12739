"""megatron's per-token loss (vocab-parallel CE inside GPTModel) equals plain torch on its logits."""

import jobs
import torch

from megamft.testing.distributed import launch


def test_megatron_loss_and_task_sums_match_plain_cross_entropy():
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
        assert abs(float(out["task_stats"][task]) - task_sum) <= 1e-4 * max(abs(task_sum), 1.0)
        assert float(out["task_stats"][3 + task]) == float(mask[rows].sum())

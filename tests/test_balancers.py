"""CoBa, FAMO and focal task weights move as their papers describe; their state round-trips."""

import pytest
import torch

from megamft.loss.balancers import CoBa, FAMO, FocalTaskWeights, window_slope
from megamft.testing.distributed import launch

import jobs


def _two_task_curves(steps: int):
    """Task 0's loss falls six times faster than task 1's, steadily."""
    for t in range(steps):
        yield t, torch.tensor([1.0 - 0.06 * t, 1.0 - 0.01 * t])


def test_window_slope_is_least_squares():
    assert window_slope(torch.tensor([1.0, 3.0, 5.0, 7.0])) == pytest.approx(2.0)
    assert window_slope(torch.tensor([4.0])) == 0.0


def test_coba_lowers_the_weight_of_the_task_that_converges_faster():
    coba = CoBa(2, history=8, warmup=3)
    history = []
    for step, losses in _two_task_curves(12):
        coba.observe_validation(step, losses)
        history.append(coba.weights())
    assert torch.allclose(history[0], torch.tensor([0.5, 0.5], dtype=torch.float64))  # uniform in warm-up
    fast, slow = history[-1]
    assert fast < slow
    assert history[-1][0] < history[0][0]  # the fast task's weight went down from uniform
    assert all(abs(float(w.sum()) - 1) < 1e-9 and float(w.min()) >= coba.min_weight - 1e-12 for w in history)


def test_famo_lowers_the_weight_of_the_task_that_improves_faster():
    famo = FAMO(2, lr=0.5)
    probabilities = []
    for step, losses in _two_task_curves(6):
        famo.after_train_step(step, losses)
        probabilities.append(famo.task_probabilities())
    assert probabilities[-1][0] < probabilities[0][0] < 0.5 + 1e-12
    assert probabilities[-1][0] < probabilities[-1][1]


def test_focal_weights_harder_tasks_more():
    focal = FocalTaskWeights(2, gamma=2.0)
    assert torch.equal(focal.weights(), torch.ones(2, dtype=torch.float64))
    focal.after_train_step(1, torch.tensor([0.1, 3.0]))
    easy, hard = focal.weights()
    assert easy < hard


@pytest.mark.parametrize("make", [lambda: CoBa(3, warmup=2), lambda: FAMO(3), lambda: FocalTaskWeights(3, 2.0)])
def test_state_round_trip_gives_the_same_future(make):
    original, restored = make(), make()
    for step, losses in enumerate(([2.0, 3.0, 4.0], [1.5, 2.9, 3.0], [1.0, 2.8, 2.5])):
        original.after_train_step(step, torch.tensor(losses))
        original.observe_validation(step, torch.tensor(losses))
    restored.load_state_dict(original.state_dict())
    for step, losses in enumerate(([0.8, 2.7, 2.1], [0.7, 2.6, 1.9]), start=3):
        for balancer in (original, restored):
            balancer.after_train_step(step, torch.tensor(losses))
            balancer.observe_validation(step, torch.tensor(losses))
        assert torch.equal(original.weights(), restored.weights())


@pytest.mark.parametrize("mode", ["famo", "coba"])
def test_balancer_state_survives_a_checkpoint_in_training(initial_weights, tmp_path, mode):
    common = ("train.train_steps=4", f"loss.mode={mode}", "loss.coba_update_interval=1", "loss.coba_warmup=2")
    reference = launch(jobs.train, 1, timeout=240, kwargs={"overrides": common + (
        f"checkpoint.load_dir={initial_weights}", "checkpoint.load_optimizer=false",
        f"checkpoint.save_dir={tmp_path}", "checkpoint.save_interval=1")})[0]
    resumed = launch(jobs.train, 1, timeout=240, kwargs={"overrides": common + (
        f"checkpoint.load_dir={tmp_path}", "checkpoint.load_iteration=2", "checkpoint.resume=never")})[0]
    assert resumed["task_weights"] == reference["task_weights"][2:]
    assert len(set(map(tuple, (w.values() for w in reference["task_weights"])))) > 1  # weights moved
    for got, want in zip(resumed["loss"], reference["loss"][2:]):
        assert abs(got - want) <= 1e-5 * abs(want)

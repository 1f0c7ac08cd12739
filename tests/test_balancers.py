"""CoBa, FAMO and focal task weights move as their papers describe; their state round-trips.

CoBa is checked step by step against a plain re-implementation of MFTCoder's CoBa
(mftcoder_accelerate, utils/loss_utils.py CoBaStatus and the trainer's schedule)
written here from its formulas; each megamft option is shown doing what it is for.
"""

import jobs
import pytest
import torch
import torch.nn.functional as F

from megamft.loss.balancers import FAMO, CoBa, FocalTaskWeights, window_slope
from megamft.loss.multitask import effective_task_weights
from megamft.testing.distributed import launch


def _two_task_curves(steps: int):
    """Task 0's loss falls six times faster than task 1's, steadily."""
    for t in range(steps):
        yield t, torch.tensor([1.0 - 0.06 * t, 1.0 - 0.01 * t])


class MFTCoderCoBa:
    """MFTCoder's CoBa as its code computes it: loss history [tasks, T], slope lists from warm-up,
    slopes by the normal equations over step numbers with zero losses dropped."""

    def __init__(self, tasks, warmup, history, tau, interval, normalizer):
        self.k, self.warmup, self.history, self.tau, self.interval = (
            tasks,
            warmup,
            history,
            tau,
            interval,
        )
        self.normalizer = normalizer.double()
        self.minimum = 1 / (tasks * 10)
        self.loss_history = self.slope_list = self.total_list = None

    def sample_valid(self, step, raw):
        value = (raw.double() / self.normalizer)[:, None]
        if self.loss_history is None and step >= 1:
            self.loss_history = value
        elif self.loss_history is not None:
            self.loss_history = torch.cat([self.loss_history, value], dim=1)

    @staticmethod
    def fit(x, y):
        y = y[y != 0]
        x = x[: len(y)].double()
        if len(y) < 2:
            return torch.tensor(0.0, dtype=torch.float64)
        design = torch.stack([x, torch.ones_like(x)], dim=1)
        return torch.linalg.solve(design.T @ design, design.T @ y)[0]

    def compute(self, step):
        start = max(0, step // self.interval - self.history)
        steps = torch.arange(start, step)
        recent = self.loss_history[:, -len(steps) :]
        slopes = torch.stack([self.fit(steps, recent[i]) for i in range(self.k)])
        total = self.fit(steps, recent.max(dim=0).values)
        if step == self.warmup:
            self.slope_list, self.total_list = slopes[:, None], total[None]
        else:
            self.slope_list = torch.cat([self.slope_list, slopes[:, None]], dim=1)
            self.total_list = torch.cat([self.total_list, total[None]])
        rcs = F.softmax(self.k * slopes / slopes.abs().sum(), dim=-1)
        window = self.slope_list[:, start:]
        acs = F.softmax(
            (-window.shape[1] * window / window.abs().sum(dim=1, keepdim=True))[:, -1], dim=-1
        )
        n = len(self.total_list)
        df = (
            F.softmax(-n * self.total_list / self.total_list.abs().sum() * self.tau, dim=-1)[-1] * n
        )
        weights = F.softmax((df * rcs + (1 - df) * acs) * self.k, dim=-1)
        if (weights < self.minimum).any():
            weights = weights * (1 - self.minimum * self.k) + self.minimum
        return weights


def _curves(steps, seed=0, absent=0.1):
    """Three tasks: one converging fast, one slowly, one that starts overfitting half-way; some
    measurements miss a task (read 0, as a sampled batch without it)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(steps, dtype=torch.float64)[:, None]
    base = torch.cat(
        [
            2.0 * torch.exp(-s / 15) + 0.5,
            1.5 - 0.004 * s,
            1.2 - 0.01 * s + 0.0004 * (s - steps / 2).clamp(min=0) ** 2,
        ],
        dim=1,
    )
    noisy = base * (1 + 0.02 * torch.randn(base.shape, generator=g, dtype=torch.float64))
    return torch.where(
        torch.rand(base.shape, generator=g, dtype=torch.float64) < absent, 0.0, noisy
    )


def _drive_megamft(coba, curves, static, normalizer):
    coba.set_normalizer(normalizer)
    used = []
    for step in range(len(curves)):
        coba.before_step(step)
        used.append(effective_task_weights("coba", len(static), static, coba))
        if coba.wants_validation(step):
            coba.observe_validation(step, curves[step])
    return used


def _drive_mftcoder(reference, curves, static):
    """MFTCoder's trainer loop: weights before the step, one sampled validation after it."""
    weights, used = static.clone(), []
    for step in range(len(curves)):
        if step % reference.interval == 0 and step >= reference.warmup:
            weights = reference.compute(step)
        used.append(weights)
        if step % reference.interval == 0 and step >= 1:
            reference.sample_valid(step, curves[step])
    return used


@pytest.mark.parametrize("warmup,history,interval", [(10, 25, 1), (8, 12, 2), (4, 200, 1)])
def test_coba_matches_mftcoder_step_by_step(warmup, history, interval):
    curves = _curves(90)
    static = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    normalizer = torch.tensor([2.6, 1.5, 1.25], dtype=torch.float64)
    ours = _drive_megamft(
        CoBa(3, warmup=warmup, history=history, update_interval=interval),
        curves,
        static,
        normalizer,
    )
    theirs = _drive_mftcoder(
        MFTCoderCoBa(3, warmup, history, 5.0, interval, normalizer), curves, static
    )
    assert torch.equal(ours[0], static)  # warm-up: the static weights, as MFTCoder
    moved = 0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.allclose(a, b.double(), rtol=1e-9, atol=1e-12), (step, a, b)
        moved += not torch.allclose(a, ours[warmup])
    assert moved > len(curves) // 3  # the weights did change along the way


def test_coba_measurements_stay_on_their_device_until_an_update():
    """Measurements are only stacked, never read, between updates (no host read during warm-up)."""
    coba = CoBa(2, warmup=5)
    coba.set_normalizer(torch.ones(2))
    for step in range(1, 4):
        coba.observe_validation(step, torch.tensor([1.0, 1.0]) - 0.1 * step)
    assert len(coba._pending) == 3 and coba.losses == []
    coba.before_step(5)
    assert coba._pending == [] and len(coba.losses) == 3


def test_coba_lowers_the_weight_of_the_task_that_converges_faster():
    coba = CoBa(2, history=8, warmup=3)
    coba.set_normalizer(torch.ones(2))
    history = []
    for step, losses in _two_task_curves(12):
        coba.before_step(step)
        history.append(coba.weights())
        if coba.wants_validation(step):
            coba.observe_validation(step, losses)
    assert torch.allclose(
        history[0], torch.tensor([0.5, 0.5], dtype=torch.float64)
    )  # uniform in warm-up
    fast, slow = history[-1]
    assert fast < slow
    assert all(
        abs(float(w.sum()) - 1) < 1e-9 and float(w.min()) >= coba.min_weight - 1e-12
        for w in history
    )


def _run(coba, curves):
    coba.set_normalizer(curves[0])
    out = []
    for step in range(len(curves)):
        coba.before_step(step)
        out.append((coba.weights(), coba.divergence))
        if coba.wants_validation(step):
            coba.observe_validation(step, curves[step])
    return out


def test_clamped_divergence_keeps_the_mix_of_scores_convex():
    """While the worst task's convergence speeds up, MFTCoder's divergence factor exceeds 1: the
    weight logits DF * RCS + (1 - DF) * ACS extrapolate past RCS (ACS enters negated), and the
    fastest-converging task's weight falls far below what RCS alone gives. Clamped at 1, the
    weights are RCS's at those steps."""
    s = torch.arange(60, dtype=torch.float64)[:, None]
    curves = torch.cat(
        [3.0 - 0.0005 * s**2, 1.0 - 0.002 * s, 1.0 - 0.01 * s + 0.001 * (s - 20).clamp(min=0) ** 2],
        dim=1,
    )
    plain = _run(CoBa(3, warmup=10, history=30), curves)
    clamped = _run(CoBa(3, warmup=10, history=30, clamp_divergence=True), curves)
    above_one = [step for step, (_, df) in enumerate(plain) if df is not None and df > 1.2]
    assert len(above_one) > 5
    for step in above_one:
        assert clamped[step][1] == 1.0
        assert plain[step][0].min() < clamped[step][0].min()
    peak = max(above_one, key=lambda step: plain[step][1])
    assert plain[peak][0].min() < 0.6 * clamped[peak][0].min()


def test_windowed_divergence_reads_a_steady_late_phase_as_converging():
    """A steep start then steady progress: against all slopes since warm-up, the latest one looks
    like divergence (DF near 0: CoBa falls back to ACS only); against a window it does not."""
    s = torch.arange(400, dtype=torch.float64)[:, None]
    curves = torch.cat(
        [3.0 * torch.exp(-s / 20) + 1.0 - 0.001 * s, 2.0 * torch.exp(-s / 30) + 1.0 - 0.0005 * s],
        dim=1,
    )
    everything = _run(CoBa(2, warmup=20, history=40), curves)[-1][1]
    window = _run(CoBa(2, warmup=20, history=40, divergence_history="window"), curves)[-1][1]
    assert everything < 0.3 < 0.8 < window


def test_multiplied_static_weights_keep_their_preference_after_warm_up():
    curves = _curves(40, absent=0.0)
    static = torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)
    replaced = _drive_megamft(CoBa(3, warmup=10, history=20), curves, static, curves[0])
    multiplied = _drive_megamft(
        CoBa(3, warmup=10, history=20, static_weights="multiply"), curves, static, curves[0]
    )
    for r, m in zip(replaced[10:], multiplied[10:]):
        assert torch.allclose(
            m, static * r
        )  # the same CoBa weights underneath, times the static ones
        assert m[0] / m.sum() > r[0] / r.sum()


def test_full_validation_removes_sampling_noise_from_the_weights():
    """Samples differ in difficulty; one sampled batch per step gives noisy slopes and weights,
    the full set gives the weights of the noise-free curves."""
    g = torch.Generator().manual_seed(3)
    steps, samples, batch = 60, 32, 4
    s = torch.arange(steps, dtype=torch.float64)[:, None]
    curves = torch.cat([2.0 * torch.exp(-s / 15) + 0.5, 1.5 - 0.006 * s], dim=1)  # [steps, tasks]
    difficulty = 0.5 + torch.rand(
        samples, 2, generator=g, dtype=torch.float64
    )  # per sample and task
    exact = _run(CoBa(2, warmup=10, history=20), curves / difficulty.mean(0) * difficulty.mean(0))
    full = _run(CoBa(2, warmup=10, history=20), curves * difficulty.mean(0))
    picks = [
        slice((step * batch) % samples, (step * batch) % samples + batch) for step in range(steps)
    ]
    sampled = _run(
        CoBa(2, warmup=10, history=20),
        torch.stack([curves[step] * difficulty[picks[step]].mean(0) for step in range(steps)]),
    )

    def gap(run):
        return max(float((w - e).abs().max()) for (w, _), (e, _) in zip(run[10:], exact[10:]))

    assert gap(full) < 1e-9
    assert gap(sampled) > 0.05


def test_window_slope_is_least_squares():
    assert window_slope(torch.tensor([1.0, 3.0, 5.0, 7.0])) == pytest.approx(2.0)
    assert window_slope(torch.tensor([4.0])) == 0.0


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


def _coba_for_round_trip():
    coba = CoBa(3, warmup=2, history=4)
    coba.set_normalizer(torch.tensor([2.0, 3.0, 4.0]))
    return coba


@pytest.mark.parametrize(
    "make", [_coba_for_round_trip, lambda: FAMO(3), lambda: FocalTaskWeights(3, 2.0)]
)
def test_state_round_trip_gives_the_same_future(make):
    original, restored = make(), make()
    for step, losses in enumerate(([2.0, 3.0, 4.0], [1.5, 2.9, 3.0], [1.0, 2.8, 2.5])):
        original.before_step(step)
        original.after_train_step(step, torch.tensor(losses))
        original.observe_validation(step, torch.tensor(losses))
    restored.load_state_dict(original.state_dict())
    for step, losses in enumerate(([0.8, 2.7, 2.1], [0.7, 2.6, 1.9]), start=3):
        for balancer in (original, restored):
            balancer.before_step(step)
            balancer.after_train_step(step, torch.tensor(losses))
            balancer.observe_validation(step, torch.tensor(losses))
        assert torch.equal(original.weights(), restored.weights())
    assert not torch.allclose(original.weights(), torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["famo", "coba"])
def test_balancer_state_survives_a_checkpoint_in_training(initial_weights, tmp_path, mode):
    common = (
        "train.train_steps=5",
        f"loss.mode={mode}",
        "loss.coba_warmup=2",
        "loss.coba_history=4",
    )
    reference = launch(
        jobs.train,
        1,
        timeout=240,
        kwargs={
            "overrides": common
            + (
                f"checkpoint.load_dir={initial_weights}",
                "checkpoint.load_optimizer=false",
                f"checkpoint.save_dir={tmp_path}",
                "checkpoint.save_interval=1",
            )
        },
    )[0]
    resumed = launch(
        jobs.train,
        1,
        timeout=240,
        kwargs={
            "overrides": common
            + (
                f"checkpoint.load_dir={tmp_path}",
                "checkpoint.load_iteration=3",
                "checkpoint.resume=never",
            )
        },
    )[0]
    assert resumed["task_weights"] == reference["task_weights"][3:]
    last = reference["task_weights"][-1]
    assert len(set(last.values())) > 1  # CoBa / FAMO moved the weights away from uniform
    for got, want in zip(resumed["loss"], reference["loss"][3:]):
        assert abs(got - want) <= 1e-5 * abs(want)

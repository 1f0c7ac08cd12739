"""Model selection: checkpoint.keep_best, checkpoint.best_metric, early stopping, the `best` pointer.

The ranking and the early-stopping count are checked against a brute-force reading of their definition
over random score sequences; pruning against the folders it must spare; a training run against the
validation losses its metrics file logged; a resumed run against the uninterrupted one.
"""

import json
import math
import random
from pathlib import Path

import pytest

from megamft.checkpoint import dist_checkpoint
from megamft.checkpoint.layout import (
    BEST,
    LATEST,
    complete_iterations,
    iteration_dir,
    pointed_checkpoint,
    write_atomically,
)
from megamft.config import ConfigError, load_config, validate
from megamft.training.selection import Selection


def _reference(scores: list[float], keep: int, patience: int, min_delta: float, lower: bool):
    """Top `keep` (step, score) by score, earlier step first on ties; the stalled count and the stop step."""
    sign = 1 if lower else -1
    ranked = sorted(enumerate(scores, start=1), key=lambda pair: (sign * pair[1], pair[0]))[:keep]
    best, stalled, stop = None, 0, None
    for step, score in enumerate(scores, start=1):
        if best is None or sign * score < sign * best - min_delta:
            best, stalled = score, 0
        else:
            stalled += 1
        if stop is None and patience and stalled >= patience:
            stop = step
    return ranked, stalled, stop


@pytest.mark.parametrize("seed", range(8))
def test_the_ranking_and_the_stall_count_follow_their_definition(seed):
    rng = random.Random(seed)
    metric = rng.choice(["valid/loss", "valid/loss/text_to_code", "eval/he/pass@1"])
    keep, patience, min_delta = rng.randint(1, 4), rng.randint(1, 5), rng.choice([0.0, 0.01, 0.1])
    scores = [round(rng.uniform(0, 1), 2) for _ in range(rng.randint(1, 30))]  # rounding makes ties
    selection = Selection(metric, keep, patience, min_delta)
    stopped_at = None
    for step, score in enumerate(scores, start=1):
        saved = selection.observe(step, {metric: score, "other": -1.0})
        assert saved == (step in selection.kept())
        if stopped_at is None and selection.should_stop():
            stopped_at = step
    ranked, stalled, stop = _reference(
        scores, keep, patience, min_delta, metric.startswith("valid/")
    )
    assert selection.ranked == ranked and selection.best_kept() == ranked[0][0]
    assert selection.stalled == stalled and stopped_at == stop


def test_a_restored_selection_continues_as_the_uninterrupted_one():
    rng = random.Random(3)
    scores = [rng.uniform(0, 1) for _ in range(20)]
    whole, first = Selection("valid/loss", 3, 4, 0.01), Selection("valid/loss", 3, 4, 0.01)
    for step, score in enumerate(scores, start=1):
        whole.observe(step, {"valid/loss": score})
        if step <= 9:
            first.observe(step, {"valid/loss": score})
    resumed = Selection("valid/loss", 3, 4, 0.01)
    assert resumed.load_state_dict(
        json.loads(json.dumps(first.state_dict()))
    )  # as stored in a checkpoint
    for step, score in list(enumerate(scores, start=1))[9:]:
        resumed.observe(step, {"valid/loss": score})
    assert resumed.state_dict() == whole.state_dict()
    assert not Selection("eval/he/pass@1", 3).load_state_dict(
        first.state_dict()
    )  # another metric: not restored


def test_non_finite_scores_rank_last_and_never_improve():
    selection = Selection("valid/loss", 2, 2)
    for step, score in enumerate([math.nan, 2.0, math.inf, 1.0], start=1):
        selection.observe(step, {"valid/loss": score})
    assert selection.ranked == [(4, 1.0), (2, 2.0)] and selection.best == (4, 1.0)


def _folders(save_dir: Path, iterations) -> None:
    for it in iterations:
        iteration_dir(save_dir, it).mkdir(parents=True)


def test_pruning_spares_the_kept_the_best_and_the_latest(tmp_path):
    _folders(tmp_path, range(1, 9))
    write_atomically(tmp_path / LATEST, "8\n")
    write_atomically(tmp_path / BEST, "2\n")
    dist_checkpoint.prune(tmp_path, keep_last=2, protected={5})
    assert complete_iterations(tmp_path) == [2, 5, 7, 8]


def test_a_best_pointer_naming_nothing_complete_spares_nothing(tmp_path):
    _folders(tmp_path, range(1, 5))
    write_atomically(tmp_path / LATEST, "4\n")
    write_atomically(tmp_path / BEST, "9\n")
    dist_checkpoint.prune(tmp_path, keep_last=1)
    assert complete_iterations(tmp_path) == [4]


def test_a_pointer_names_its_checkpoint(tmp_path):
    _folders(tmp_path, (3, 6))
    write_atomically(tmp_path / LATEST, "6\n")
    write_atomically(tmp_path / BEST, "3\n")
    assert pointed_checkpoint(tmp_path / BEST) == iteration_dir(tmp_path, 3)
    assert pointed_checkpoint(tmp_path / LATEST) == iteration_dir(tmp_path, 6)
    assert pointed_checkpoint(tmp_path) == tmp_path  # a save folder stays a save folder
    write_atomically(tmp_path / BEST, "4\n")
    with pytest.raises(RuntimeError, match=r"best names '4', which is not a complete checkpoint"):
        pointed_checkpoint(tmp_path / BEST)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["checkpoint.keep_best=2", "train.eval_interval=5"],
            "checkpoint.keep_best needs checkpoint.save_dir",
        ),
        (["train.early_stopping_patience=2"], "set train.eval_interval > 0"),
        (
            ["checkpoint.best_metric=valid/acc"],
            "give valid/loss, valid/loss/<task> or eval/<benchmark>/pass@<k>",
        ),
        (
            [
                "checkpoint.best_metric=eval/he/pass@1",
                "train.early_stopping_patience=2",
                "eval.interval=5",
            ],
            "no benchmark 'he' in eval.problems",
        ),
        (
            [
                "checkpoint.best_metric=eval/he/pass@10",
                "train.early_stopping_patience=2",
                "eval.interval=5",
                "eval.problems={he: humaneval}",
            ],
            "pass@10 is not measured; add 10 to eval.k",
        ),
        (
            [
                "train.early_stopping_patience=2",
                "train.eval_interval=5",
                "data.valid_samples_per_task=0",
            ],
            "needs validation data",
        ),
    ],
)
def test_selection_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(load_config([], overrides), 1)


def test_a_task_the_data_does_not_have_is_refused_when_the_data_is_known():
    cfg = load_config(
        [],
        [
            "checkpoint.best_metric=valid/loss/nope",
            "train.early_stopping_patience=2",
            "train.eval_interval=2",
        ],
    )
    with pytest.raises(ConfigError, match="no task 'nope' in the data"):
        Selection.from_config(cfg, ("code_completion", "text_to_code"))


def _simulated_peak(
    tmp: Path,
    keep_last: int,
    keep_best: int,
    steps: int,
    save_interval: int,
    eval_interval: int,
    async_save: bool,
    scores: list[float],
) -> int:
    """Save as the loop does (a measurement that ranks among the kept best, every save_interval, the end),
    publish (with async saves, after the next one started) and prune with dist_checkpoint.prune; the most
    checkpoint folders present at once."""
    selection = Selection("valid/loss", keep_best)
    peak, in_flight = 0, []

    def publish(it, kept, best):
        iteration_dir(tmp, it).with_name(f"iter_{it:07d}.partial").rename(iteration_dir(tmp, it))
        write_atomically(tmp / LATEST, f"{it}\n")
        if best is not None:
            write_atomically(tmp / BEST, f"{best}\n")
        dist_checkpoint.prune(tmp, keep_last, kept)

    for step in range(1, steps + 1):
        ranks = (
            bool(eval_interval)
            and step % eval_interval == 0
            and selection.observe(step, {"valid/loss": scores[step - 1]})
        )
        if ranks or (save_interval and step % save_interval == 0) or step == steps:
            iteration_dir(tmp, step).with_name(f"iter_{step:07d}.partial").mkdir(parents=True)
            in_flight.append((step, selection.kept(), selection.best_kept()))
            peak = max(peak, sum(1 for p in tmp.iterdir() if p.name.startswith("iter_")))
            if len(in_flight) > (1 if async_save else 0):
                publish(*in_flight.pop(0))
    for args in in_flight:
        publish(*args)
    return peak


@pytest.mark.parametrize(
    "keep_last,keep_best,save_interval,eval_interval,async_save",
    [(1, 2, 4, 1, False), (2, 3, 0, 2, True), (1, 1, 5, 3, False), (3, 2, 2, 2, True)],
)
def test_the_room_counted_covers_the_checkpoints_kept_for_their_score(
    tmp_path, keep_last, keep_best, save_interval, eval_interval, async_save
):
    from megamft.checkpoint import run_folder

    steps = 24
    cfg = load_config(
        [],
        [
            f"checkpoint.keep_last={keep_last}",
            f"checkpoint.keep_best={keep_best}",
            f"train.train_steps={steps}",
            f"checkpoint.save_interval={save_interval}",
            f"train.eval_interval={eval_interval}",
            f"checkpoint.async_save={async_save}",
        ],
    )
    counted = run_folder.new_checkpoints_at_once(cfg, 0, 0)
    worst = [
        float(step) for step in range(steps)
    ]  # each measurement worse: the first ones stay the best
    peak = _simulated_peak(
        tmp_path / "worst",
        keep_last,
        keep_best,
        steps,
        save_interval,
        eval_interval,
        async_save,
        worst,
    )
    assert (
        peak == counted if save_interval else peak <= counted
    )  # regular saves fill keep_last: the bound is met
    rng = random.Random(keep_last * 10 + keep_best)
    for trial in range(5):
        scores = [rng.uniform(0, 1) for _ in range(steps)]
        assert (
            _simulated_peak(
                tmp_path / str(trial),
                keep_last,
                keep_best,
                steps,
                save_interval,
                eval_interval,
                async_save,
                scores,
            )
            <= counted
        )


# ---- a training run: what it keeps, names and stops at ------------------------------------------------------

RUN = (
    "model.num_layers=2",
    "data.valid_samples_per_task=2",
    "optimizer.lr=0.05",
    "train.eval_interval=1",
    "checkpoint.keep_best=2",
    "checkpoint.keep_last=1",
    "train.early_stopping_patience=3",
    "train.early_stopping_min_delta=1.0",
    "train.lr_decay_style=constant",
)  # steps change on resume


def _train(save_dir: Path, steps: int) -> dict:
    import jobs

    from megamft.testing.distributed import launch

    overrides = (*RUN, f"train.train_steps={steps}", f"checkpoint.save_dir={save_dir}")
    return launch(jobs.train, 1, kwargs={"overrides": overrides}, timeout=300)[0]


def _logged_validation(save_dir: Path) -> dict[int, float]:
    """valid/loss per step of the in-loop validations, from the run's metrics file (last line wins)."""
    logged = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "valid/loss" in record and record["step"] > 0:
            logged[record["step"]] = record["valid/loss"]
    return logged


@pytest.mark.slow
def test_a_run_keeps_the_best_checkpoints_stops_on_a_stall_and_resumes_to_the_same_choice(tmp_path):
    whole = _train(tmp_path / "whole", 10)
    losses = _logged_validation(tmp_path / "whole")
    scores = [losses[step] for step in sorted(losses)]
    ranked, _, stop = _reference(scores, keep=2, patience=3, min_delta=1.0, lower=True)
    assert stop is not None and stop < 10 and whole["stopped_early"] and len(whole["loss"]) == stop
    assert sorted(losses) == list(range(1, stop + 1))
    # On disk: the two best measured steps and the last one (keep_last=1); `best` names the best.
    assert complete_iterations(tmp_path / "whole") == sorted({step for step, _ in ranked} | {stop})
    assert pointed_checkpoint(tmp_path / "whole" / BEST) == iteration_dir(
        tmp_path / "whole", ranked[0][0]
    )
    assert whole["best"] == {
        "metric": "valid/loss",
        "step": ranked[0][0],
        "score": ranked[0][1],
        "checkpoint": str(iteration_dir(tmp_path / "whole", ranked[0][0])),
    }
    # Stopped at step 4 by train.train_steps, then resumed: the same stop, the same checkpoints, the same best.
    first = _train(tmp_path / "split", 4)
    assert not first["stopped_early"] and len(first["loss"]) == 4
    resumed = _train(tmp_path / "split", 10)
    assert len(first["loss"]) + len(resumed["loss"]) == stop and resumed["stopped_early"]
    assert complete_iterations(tmp_path / "split") == complete_iterations(tmp_path / "whole")
    assert resumed["best"] == {
        **whole["best"],
        "checkpoint": str(iteration_dir(tmp_path / "split", ranked[0][0])),
    }

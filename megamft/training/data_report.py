"""The start-up summary of what a run's sequences leave out of its data, logged and kept in its manifest.

megamft.data.coverage counts what the data gives (samples cut to data.seq_length,
tasks a data epoch never samples); here the run adds what only its length decides
(tasks absent from every sequence it will train on), logs each finding as one
line on the logging rank, and rank 0 records them in checkpoint.save_dir's
run_manifest.json.
"""

from __future__ import annotations

import logging

from megamft.config import MegamftConfig
from megamft.data.dataset import MultitaskData
from megamft.platform import distributed
from megamft.training.run_manifest import write_section

log = logging.getLogger("megamft")


def report_data(cfg: MegamftConfig, data: MultitaskData, rank: int) -> dict:
    """Log what the data leaves out, record it in the run's manifest (rank 0), and return the record."""
    coverage = data.coverage
    absent = tasks_absent_from_run(cfg, data)
    record = {**coverage.record(), "tasks_absent_from_run": absent}
    if distributed.is_logging_rank():
        lines = coverage.lines()
        log.log(logging.WARNING if coverage.train.overlong else logging.INFO, "%s", lines[0])
        for line in lines[1:]:
            log.warning("%s", line)
        for task, why in absent.items():
            log.warning("task %s: %s", task, why)
    if rank == 0 and cfg.checkpoint.save_dir:
        write_section(cfg.checkpoint.save_dir, "data", record)
    return record


def tasks_absent_from_run(cfg: MegamftConfig, data: MultitaskData) -> dict[str, str]:
    """Tasks that a data epoch samples but none of the sequences this run trains on holds (a run shorter
    than one data epoch), with the keys that would change it."""
    run_sequences = cfg.train.train_steps * cfg.train.global_batch_size
    per_epoch = data.train.sequences_per_epoch()
    if run_sequences >= per_epoch:
        return {}
    present = data.train.tasks_of_first(run_sequences)
    quotas = data.train.quota
    return {
        name: (
            f"none of the {run_sequences:,} sequences this run trains on (train.train_steps x "
            f"train.global_batch_size, of {per_epoch:,} in a data epoch) holds one of its {int(quota):,} "
            "samples per epoch; raise train.train_steps or the task's share (data.task_sampling, "
            "data.task_sampling_weights)"
        )
        for task, (name, quota) in enumerate(zip(data.task_names, quotas.tolist()))
        if quota > 0 and task not in present
    }

"""Before validation and the first step: the data's files are those megamft-preprocess wrote.

The first rank of each node checks the files' content in the background from the moment the
data is opened (MultitaskData.checksums, data/verify.py); here every rank waits for its answer
and all stop together, with the same one error naming the file, if any node found a file that
is not as recorded. Ranks agree over the gloo host group, so no GPU work is waited for.
"""

from __future__ import annotations

import logging

import torch

from megamft.data.dataset import MultitaskData
from megamft.data.identity import data_identity
from megamft.data.manifest import CHECKSUMS, DataIntegrityError
from megamft.platform import distributed

log = logging.getLogger("megamft")


def report_unverified(data: MultitaskData) -> None:
    """Say once (on the logging rank) that a manifest without checksums leaves the content unchecked."""
    if (
        data.manifest is not None
        and CHECKSUMS not in data.manifest
        and distributed.is_logging_rank()
    ):
        log.warning(
            "data.path %s: its manifest.json records no checksums (written by an older "
            "megamft-preprocess), so the files' content is not verified, only their sizes; re-run "
            "megamft-preprocess to record them",
            data.cfg.path,
        )


def wait_for_checksums(data: MultitaskData) -> None:
    """Every rank raises the same DataIntegrityError if a node found a damaged file; returns otherwise."""
    problem = data.checksums.problem() if data.checksums is not None else None
    found = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(found, problem, group=distributed.host_group())
    problem = next((p for p in found if p), None)
    if problem:
        raise DataIntegrityError(problem)
    if data.checksums is not None and distributed.is_logging_rank():
        log.info("%s", data.checksums.summary())


def checkpoint_data_identity(data: MultitaskData) -> dict | None:
    """What a checkpoint records of the data it was trained on (None: no checksums to identify it by)."""
    return data_identity(data.manifest) if data.manifest is not None else None

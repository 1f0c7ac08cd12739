"""What the checks share during a run: profile, folders, report, deadlines, what earlier checks left."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .process import free_port
from .profiles import Profile
from .report import Report


class Interrupted(BaseException):
    """SIGTERM or SIGINT: stop, kill children, write what we have."""


class NotRun(Exception):
    """A check that cannot run on this machine (what it needs is missing); the message says what and why."""


@dataclass
class Context:
    profile: Profile
    out: Path
    work: Path
    report: Report
    deadline: float  # monotonic, whole run
    dry: bool
    jobs: int
    python: str = sys.executable
    check_deadline: float = 0.0
    config_path: Path | None = None
    cuda: bool | None = None
    full_checkpoint: Path | None = None
    lora_checkpoint: Path | None = None
    lora_run: dict | None = None  # the lora check's overrides and run: lora_te's reference
    notes: dict = field(default_factory=dict)

    def left(self) -> float:
        return min(self.deadline, self.check_deadline) - time.monotonic()

    def env(self, **extra) -> dict:
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in {
                "RANK",
                "LOCAL_RANK",
                "WORLD_SIZE",
                "LOCAL_WORLD_SIZE",
                "GROUP_RANK",
                "ROLE_RANK",
                "MASTER_PORT",
                "TORCHELASTIC_RUN_ID",
            }
        }
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            MEGAMFT_COUNT_SYNCS="1",
        )  # torch's sync debug mode per step
        env.setdefault("OMP_NUM_THREADS", self.profile.omp_threads)
        env.update(extra)
        return env

    def timeout(self, cap: float) -> float:
        return max(0.0, min(cap, self.left()))

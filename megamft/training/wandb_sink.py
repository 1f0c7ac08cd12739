"""Weights & Biases as a metrics sink (train.wandb_project): the same names and steps as TensorBoard.

The run's whole config is the W&B run's config. A run with a checkpoint.save_dir keeps its W&B run id
in the save folder's run_manifest.json ("wandb" section), so a resumed run continues the same W&B run.
WANDB_MODE=offline writes the run under `<save_dir>/wandb/` without a network (`wandb sync` uploads it).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from megamft.config import to_dict
from megamft.errors import UserError
from megamft.training.run_manifest import read_run_manifest, write_section


class WandbMissing(UserError, ImportError):
    """train.wandb_project without the wandb package."""


def _run_id(save_dir: str | None) -> str:
    """The W&B run id of this save folder (made and recorded at its first start), or a new one."""
    if not save_dir:
        return secrets.token_hex(8)
    recorded = read_run_manifest(save_dir).get("wandb", {}).get("id")
    if isinstance(recorded, str) and recorded:
        return recorded
    run_id = secrets.token_hex(8)
    write_section(save_dir, "wandb", {"id": run_id})
    return run_id


class WandbSink:
    def __init__(self, cfg):
        try:
            import wandb
        except ImportError:
            raise WandbMissing(
                "train.wandb_project is set but wandb is not installed: pip install "
                "'megamft[wandb]' (or unset train.wandb_project)"
            ) from None
        folder = cfg.checkpoint.save_dir or cfg.train.tensorboard_dir or "."
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.train.wandb_project,
            name=cfg.train.wandb_name,
            id=_run_id(cfg.checkpoint.save_dir),
            resume="allow",
            dir=str(folder),
            config=to_dict(cfg),
        )

    def write(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()

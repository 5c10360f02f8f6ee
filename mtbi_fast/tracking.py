"""Experiment trackers a run reports to (``train.report_to``): the rows of ``metrics.jsonl``.

- ``tensorboard``: event files in ``<output_dir>/tensorboard`` (``tensorboard --logdir``);
- ``wandb``: a Weights & Biases run with the resolved config, under ``<output_dir>/wandb``. The
  usual W&B variables apply (``WANDB_PROJECT``, default "mtbi-fast"; ``WANDB_ENTITY``;
  ``WANDB_MODE=offline`` writes the run to disk for a later ``wandb sync``). A resumed run
  continues the same W&B run (its id is kept in ``<output_dir>/wandb_run_id``).

A tracker that is asked for and not installed is an error naming its package, raised by
``check_trackers`` while the config is read, before anything is built.
"""

from __future__ import annotations

import importlib.util
import math
import os
import uuid
from pathlib import Path

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs
WANDB_ID_FILE = "wandb_run_id"


def check_trackers(names, where: str = "train.report_to") -> list[str]:
    """``names`` checked: known trackers, each installed; returns them as a list."""
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"{where} must be a list of trackers ({', '.join(TRACKERS)}), got {names!r}")
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"{where}: unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"{where}: {name} needs the {package} package, which is not installed: "
                             f"pip install {package} (or leave {name} out of {where})")
    return list(names)


class Trackers:
    """The trackers of one run (rank 0): ``log(row)`` sends a metrics row's numbers to each."""

    def __init__(self, names: list[str], out: Path, config: dict):
        self.out = Path(out)
        self.tensorboard = self.wandb = None
        names = check_trackers(names)
        try:
            if "tensorboard" in names:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            if "wandb" in names:
                self.wandb = _start_wandb(self.out, config)
        except BaseException:
            self.close()
            raise

    def log(self, row: dict) -> None:
        step = row["step"]
        numbers = {k: float(v) for k, v in row.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None and numbers:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(out: Path, config: dict):
    import wandb

    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mtbi-fast"), name=out.name, id=run_id,
                     resume="allow", dir=str(out), config=config, reinit="create_new")
    if not id_file.is_file():
        from .io import atomic_write_text

        atomic_write_text(id_file, run_id + "\n")
    return run

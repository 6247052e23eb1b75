"""Training logs shared by the trainers: an append-only CSV that survives resume, and optional
TensorBoard / W&B trackers."""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any

from vgs.errors import VGSError


class CsvLog:
    """Append-only CSV; on resume, rows after the resumed step are dropped first, so the file
    reads as one uninterrupted run."""

    def __init__(self, path: str, fields: list[str], keep_through_step: int | None):
        self.path, self.fields = path, fields
        rows = []
        if keep_through_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_through_step]
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=fields, extrasaction="ignore")

    def write(self, row: dict) -> None:
        self.w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class Trackers:
    """TensorBoard / W&B, only when installed and asked for (`cfg`: tensorboard, wandb_project,
    run_name, out)."""

    def __init__(self, cfg: Any, main: bool):
        self.tb = self.wandb = None
        if not main:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # noqa: BLE001
                raise VGSError(f"--tensorboard needs the tensorboard package ({exc})") from exc
            self.tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
        if cfg.wandb_project:
            try:
                import wandb
            except Exception as exc:  # noqa: BLE001
                raise VGSError(f"--wandb-project needs the wandb package ({exc})") from exc
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, config=dataclasses.asdict(cfg),
                                    id=(cfg.run_name or None), resume="allow")

    def log(self, prefix: str, row: dict, step: int) -> None:
        vals = {f"{prefix}/{k}": v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for k, v in vals.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(vals, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()

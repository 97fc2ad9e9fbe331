"""The training state: everything a checkpoint holds, with saving and restoring side by side.

`TrainingState` owns the model, optimizer, scheduler and GradScaler together with the run's
counters (epochs done, best validation accuracy, history), the configuration that made it and
the dataset's classes. `state_dict()` is exactly what `load_state_dict()` takes back; a resumed run
calls `check_resumable` first, so a run directory is only continued by a compatible run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


class IncompatibleCheckpoint(Exception):
    """The run directory holds a checkpoint this run must not continue."""


@dataclass
class TrainingState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    config: dict
    classes: list[str]
    epoch: int = 0  # epochs finished
    best_val_acc: float = -1.0
    history: list[dict] = field(default_factory=list)

    def finish_epoch(self, record: dict) -> bool:
        """Counts a finished epoch (its record from train_one_epoch + evaluate); True if it is the best so far."""
        self.epoch = record["epoch"]
        self.history.append(record)
        self.scheduler.step()
        is_best = record["val_acc"] > self.best_val_acc
        self.best_val_acc = max(self.best_val_acc, record["val_acc"])
        return is_best

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_val_acc": self.best_val_acc,
            "history": self.history,
            "config": self.config,
            "classes": self.classes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best_val_acc, self.history = state["epoch"], state["best_val_acc"], state["history"]


def run_config(args) -> dict:
    """The run's options as a checkpoint stores them (paths as text, so it loads with weights_only)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def check_resumable(saved: dict, config: dict, classes: list[str], where: str) -> None:
    """A run directory can only be resumed by the run that made it."""
    if saved["classes"] != classes:
        raise IncompatibleCheckpoint(
            f"{config['data']} has {len(classes)} classes but the checkpoint in {where} was trained on "
            f"{len(saved['classes'])} (different classes); use a new --output"
        )
    for key in ("arch", "freeze"):
        if saved["config"][key] != config[key]:
            raise IncompatibleCheckpoint(
                f"--{key} {config[key]} differs from the checkpoint in {where} ({saved['config'][key]}); "
                "use a new --output"
            )

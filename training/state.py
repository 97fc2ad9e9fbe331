"""The training state: everything a checkpoint holds, with saving and restoring side by side.

`TrainingState` owns the model, optimizer and GradScaler together with where the run stands: the
epoch in progress, the stretches of it already trained (a resume starts a new stretch, possibly on
another world size), the global loss/accuracy sums of those stretches, the best validation accuracy,
the history, the configuration that made it and the dataset's classes. `state_dict()` is exactly
what `load_state_dict()` takes back. Before a resume, `reconcile` refuses a checkpoint this run must
not continue, naming every difference, and says what changes it does take on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.exit_codes import IncompatibleCheckpoint

# A checkpoint of another architecture, frozen part or optimizer holds tensors of other shapes.
INCOMPATIBLE = ("arch", "freeze", "optimizer")
# Options whose change means nothing to a resumed run (where files go, how fast it runs, logging).
NO_EFFECT = {"output", "cache_dir", "feature_cache_dir", "workers", "log_every", "keep_checkpoints", "pretrained",
             "overwrite_unresumable", "mlflow_experiment"}  # fmt: skip
FORMAT = "petal-checkpoint/2"


@dataclass
class TrainingState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: dict
    classes: list[str]
    data: str  # fingerprint of the training shards the epoch's sample numbers refer to
    epoch: int = 1  # the epoch in progress, 1-based
    stretches: list[dict] = field(default_factory=list)  # {"world_size", "batch_size", "steps"} done in `epoch`
    train_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss * n, correct, n in `epoch`
    best_val_acc: float = -1.0
    history: list[dict] = field(default_factory=list)

    @property
    def steps_done(self) -> int:
        """Optimizer steps of the epoch in progress already taken."""
        return sum(stretch["steps"] for stretch in self.stretches)

    def finish_epoch(self, record: dict) -> bool:
        """Counts a finished epoch (its train_one_epoch + evaluate record); True if it is the best so far."""
        self.history.append(record)
        self.epoch, self.stretches, self.train_sums = record["epoch"] + 1, [], [0.0, 0.0, 0.0]
        is_best = record["val_acc"] > self.best_val_acc
        self.best_val_acc = max(self.best_val_acc, record["val_acc"])
        return is_best

    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "stretches": self.stretches,
            "train_sums": self.train_sums,
            "data": self.data,
            "best_val_acc": self.best_val_acc,
            "history": self.history,
            "config": self.config,
            "classes": self.classes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this run's hyper-parameters, not the saved ones
            group["weight_decay"] = self.config["weight_decay"]
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best_val_acc, self.history = state["epoch"], state["best_val_acc"], state["history"]
        if state["data"] == self.data and state["config"]["seed"] == self.config["seed"]:
            self.stretches, self.train_sums = state["stretches"], state["train_sums"]


def run_config(args) -> dict:
    """The run's options as a checkpoint stores them (paths as text, so it loads with weights_only)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def reconcile(saved: dict, config: dict, classes: list[str], data: str, where: str, log: Callable[[str], None]):
    """Refuses a checkpoint this run must not continue (IncompatibleCheckpoint naming every
    difference); logs each change the resumed run takes on, and what it does with it."""
    if saved.get("format") != FORMAT:
        raise IncompatibleCheckpoint(f"the checkpoint in {where} is of format {saved.get('format')!r}, this petal "
                                     f"writes {FORMAT!r}; use a new --output")  # fmt: skip
    before = saved["config"]
    problems = [f"--{key.replace('_', '-')} {config[key]} (the checkpoint: {before[key]})"
                for key in INCOMPATIBLE if before[key] != config[key]]  # fmt: skip
    if saved["classes"] != classes:
        problems.append(f"{config['data']} has {len(classes)} classes, the checkpoint was trained on "
                        f"{len(saved['classes'])} (different classes)")  # fmt: skip
    if problems:
        raise IncompatibleCheckpoint(f"cannot resume {where}: " + "; ".join(problems) + "; use a new --output")
    if saved["stretches"] and (saved["data"] != data or before["seed"] != config["seed"]):
        log(f"the training data or --seed changed since epoch {saved['epoch']} began, so the samples it "
            "already trained cannot be told apart: that epoch restarts from its first step")  # fmt: skip
    for key in sorted(set(config) - NO_EFFECT - set(INCOMPATIBLE)):
        if before.get(key) != config[key]:
            flag = f"--{key.replace('_', '-')}"
            log(f"{flag} changed from {before.get(key)} to {config[key]} on resume{EFFECT.get(key, '')}")


EFFECT = {
    "epochs": (": the learning-rate schedule is recomputed for the new total, so the next epoch's rate "
               "is the new curve's at that epoch (with cosine, a step up when epochs are added)"),
    "lr": ": the schedule is the same shape, scaled to the new rate from the next step on",
    "batch_size": ": the global batch changes with it; the epoch's remaining samples are split as before",
    "data": ": the same classes, so training continues on the new dataset",
}  # fmt: skip

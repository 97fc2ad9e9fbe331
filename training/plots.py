"""The two pictures a run leaves in its output: learning curves and per-class validation accuracy."""

from __future__ import annotations

import io
from functools import cache


@cache
def pyplot():
    """matplotlib, loaded by the first plot: only rank 0 draws, and the import costs every rank a second."""
    import matplotlib

    matplotlib.use("Agg")  # pods and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def curves_png(history: list[dict]) -> bytes:
    """Loss and top-1 accuracy per epoch, train against validation."""
    epochs = [r["epoch"] for r in history]
    fig, (loss, acc) = pyplot().subplots(1, 2, figsize=(10, 4))
    loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    acc.plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
    acc.plot(epochs, [r["val_acc"] for r in history], "o-", label="validation")
    acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (loss, acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def per_class_figure(class_names: list[str], accuracy: list[float], epoch: int):
    """Validation accuracy of each class at `epoch`, worst first, so the weak classes stand out."""
    order = sorted(range(len(class_names)), key=lambda i: accuracy[i])
    fig, ax = pyplot().subplots(figsize=(8, max(3, 0.22 * len(class_names) + 1)))
    ax.barh([class_names[i] for i in order], [accuracy[i] for i in order], color="tab:green")
    ax.set(
        xlabel="validation top-1 accuracy",
        xlim=(0, 1),
        title=f"Per-class validation accuracy (epoch {epoch})",
    )
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return fig


def per_class_png(class_names: list[str], accuracy: list[float], epoch: int) -> bytes:
    return _png(per_class_figure(class_names, accuracy, epoch))

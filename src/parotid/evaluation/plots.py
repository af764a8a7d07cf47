"""ROC, precision-recall and reliability plots (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import curves, reliability_bins  # noqa: E402


def roc_pr_plot(entries: dict, path: str, title: str = "") -> None:
    """entries: name -> (y, score). Two panels: ROC and PR."""
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, (y, s) in entries.items():
        (fpr, tpr), (rec, prec) = curves(y, s)
        ax[0].plot(fpr, tpr, label=name)
        ax[1].plot(rec, prec, label=name)
    ax[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    ax[0].set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC " + title)
    ax[1].set(xlabel="recall", ylabel="precision", title="PR " + title)
    for a in ax:
        a.legend(fontsize=7, loc="lower right" if a is ax[0] else "lower left")
        a.grid(alpha=0.3)
    fig.suptitle("SYNTHETIC data", color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability_plot(entries: dict, path: str, n_bins: int = 10) -> None:
    """entries: name -> (y, prob (n, classes))."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    for name, (y, p) in entries.items():
        b = reliability_bins(y, p, n_bins)
        m = b[:, 3] > 0
        ax.plot(b[m, 2], b[m, 1], "o-", label=name)
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", title="Reliability (SYNTHETIC)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_plot(cm, classes, path: str, title: str = "") -> None:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} (SYNTHETIC)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

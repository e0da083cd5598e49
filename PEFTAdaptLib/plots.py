"""PNG reports: the audited Dice curve and overlay slices (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def dice_curve(history: Sequence[tuple[int, float]], path: str | Path, title: str = "Audit Dice") -> Path:
    steps, scores = zip(*history)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, scores, marker="o")
    ax.axhline(scores[0], color="grey", linestyle="--", linewidth=1, label=f"zero-shot {scores[0]:.3f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("Dice on the audit volume")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def overlay_slices(
    image: np.ndarray, overlays: dict[str, np.ndarray], reference: np.ndarray, path: str | Path
) -> Path:
    """Axial/coronal/sagittal middle slices of `image` (x, y, z) with each named mask's contour against the reference."""
    centre = [int(np.mean(np.nonzero(reference.any(axis=tuple(a for a in range(3) if a != k)))[0]))
              for k in range(3)]
    views = [("sagittal", 0), ("coronal", 1), ("axial", 2)]
    fig, axes = plt.subplots(len(overlays), 3, figsize=(9, 3.1 * len(overlays)), dpi=110, squeeze=False)
    for row, (name, mask) in enumerate(overlays.items()):
        for col, (view, axis) in enumerate(views):
            take = lambda a: np.rot90(np.take(a, centre[axis], axis=axis))  # noqa: E731
            ax = axes[row][col]
            ax.imshow(take(image), cmap="gray")
            ax.contour(take(reference.astype(float)), levels=[0.5], colors="lime", linewidths=0.8)
            ax.contour(take(mask.astype(float)), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{name} — {view}", fontsize=9)
            ax.axis("off")
    fig.suptitle("green: reference, red: prediction", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

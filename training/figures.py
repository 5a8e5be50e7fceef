"""What every PNG figure of the reports shares: the headless backend, how a figure is saved, and
the thumbnail contact sheet (flagged audit files, evaluation worklists).

Kept apart from the figures themselves so the evaluation, audit and robustness figures look alike
and a change of format (dpi, layout) is made once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

FIGURE_DPI = 110
SHEET_DPI = 100
THUMBNAIL_PX = 128


def save_figure(fig, path: Path, dpi: int = FIGURE_DPI) -> None:
    """Lay out, write and close ``fig`` (closing matters: a report run draws dozens of figures)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def thumbnail_sheet(images: Sequence[tuple[Path, str]], title: str, path: Path, columns: int = 8) -> None:
    """A grid of grayscale thumbnails, each ``(file, caption)``; nothing is written for no images.

    A file that cannot be opened shows ``unreadable``: such files are often what the sheet lists.
    """
    if not images:
        return
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.7, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (file, caption) in zip(axes.flat, images):
        try:
            with Image.open(file) as image:
                image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                ax.imshow(np.asarray(image.convert("L")), cmap="gray", vmin=0, vmax=255)
        except Exception:  # noqa: BLE001  any decoder failure: the file is shown as unreadable
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
        ax.set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=SHEET_DPI)

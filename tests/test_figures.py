"""The shared figure helpers (training.figures): contact sheets of the audit and the worklists."""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.figures import thumbnail_sheet


def test_thumbnail_sheet_draws_readable_and_unreadable_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (300, 1))).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "sheet.png"
    thumbnail_sheet([(good, "good"), (broken, "broken"), (tmp_path / "missing.png", "missing")], "three", out)
    with Image.open(out) as sheet:
        width, height = sheet.size
    assert (width, height) == (round(3 * 1.7 * 100), round(2.2 * 100))  # three columns, one row, at 100 dpi


def test_thumbnail_sheet_writes_nothing_for_no_images(tmp_path):
    thumbnail_sheet([], "none", tmp_path / "sheet.png")
    assert not (tmp_path / "sheet.png").exists()

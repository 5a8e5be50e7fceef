"""The command line shared by the serving reports that measure one bundle (gate, conformance)."""

from __future__ import annotations

import argparse
from pathlib import Path


def bundle_report_parser(prog: str, doc: str | None, out: str) -> argparse.ArgumentParser:
    """``--bundle`` (required), ``--data-dir`` (``DATA_DIR`` or the default cxr3), ``--out``, ``--bundle-name``."""
    from training.data import default_data_dir

    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--bundle-name", default=None, help="how the report names the bundle (default: its path)")
    return parser

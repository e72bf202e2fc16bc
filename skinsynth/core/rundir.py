"""The run directory: every stage folder and file named once, stage manifests, and atomic folder replacement."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The stage manifest, or None when absent or unreadable."""
    try:
        return json.loads((Path(stage_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def replace_dir(new: Path, target: Path) -> None:
    """Swap a finished temp folder into place; the old one is removed only after the new one is in."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

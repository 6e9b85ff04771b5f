"""Atomic file writes: write a temporary name beside the target, then rename it over the target, so a
reader never sees a half-written file and an interrupted run leaves only a `*.tmp` behind."""
from __future__ import annotations

import json
from pathlib import Path


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=1, default=float))

"""Atomic file writes: write a temporary name beside the target, then rename it over the target, so a
reader never sees a half-written file and an interrupted run leaves only a `*.tmp` behind."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic(path: str | Path, suffix: str = ""):
    """Yield a temporary path beside `path` (`name.tmp`, plus `suffix` for writers that pick the format
    from the extension, e.g. ".png"); once the block ends without error, rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp" + suffix)
    yield tmp
    tmp.replace(path)


@contextmanager
def atomic_folder(path: str | Path):
    """Yield an empty temporary folder's path beside `path` (`name.tmp`, not yet created: a writer
    such as `shutil.copytree` makes it); once the block ends without error, it replaces `path`. The
    last step removes the old folder before the rename, so only that moment leaves neither."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=1, default=float))

"""The one atomic writer: a killed process never leaves a half-written file under its final name.

Every file the pipeline writes that a later stage or a resume reads goes through
``atomic_write``: the content is written to a temp file in the same folder, which is then
renamed over the final name (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path``; on any error the temp file is
    removed and ``path`` keeps its old content (or stays absent). Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        make_shareable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, obj, **dumps) -> Path:
    return atomic_write_text(path, json.dumps(obj, **{"indent": 1, **dumps}))


def make_shareable(path: Path) -> None:
    """Give a file written through a private temp file (mode 0600) the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)

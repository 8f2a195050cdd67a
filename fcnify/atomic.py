"""Writing files so that a half-written one never looks complete.

Every output is written to a hidden temp file beside its target (``.<stem>.XXXX.tmp<suffix>``: the real suffix
stays last because some writers check it) and renamed into place when complete. ``mkstemp`` creates files
readable by their owner only; they are widened to what the user's umask allows, as a plain ``open`` would,
so outputs on a shared filesystem stay readable by the team.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fcnify.errors import OutputError

__all__ = ["atomic_output", "temp_beside"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(target: str | os.PathLike) -> Path:
    """Create an empty hidden temp file next to ``target`` and return its path.

    Raises:
        OutputError: the folder cannot be written.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror}", hint="choose a writable folder") from exc
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


@contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False):
    """Yield a temp path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} already exists", hint="pass --force to overwrite it, or choose another -o")
    if path.is_dir():
        raise OutputError(f"{path} is a directory", hint="give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"the folder {parent} does not exist", hint="create it first or choose another -o")
    tmp = temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

"""Private files and directories: owner-only whatever the umask.

The orchestrator often runs on a shared login node, and a worker on a shared compute node: the
database, the tokens, the log and the job dirs must not be readable by the other users there,
even when the process was started with a permissive umask (0o000, 0o002). A mode given to
`mkdir`/`open` is masked by the umask, so each helper also sets the mode explicitly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path, *, fix_existing: bool = True) -> Path:
    """Create `path` (and its missing parents) and make it 0700. With `fix_existing=False` a
    directory that already exists is left as it is (a configured log or database location may
    be a shared directory that is not ours to lock down)."""
    existed = path.is_dir()
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    if existed and not fix_existing:
        return path
    try:
        os.chmod(path, PRIVATE_DIR)
    except PermissionError:  # someone else's directory: ours to use, not to chmod
        log.warning("%s: cannot make the directory private (mode 0700): not its owner", path)
    return path


def private_path(path: Path, *, create: bool = True) -> None:
    """Make `path` 0600 without ever opening an existing file (closing a descriptor drops the
    process's POSIX locks on the file, SQLite's among them: see Store._open). A missing file is
    created empty and 0600 when `create`, and left missing otherwise."""
    if create:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
        except FileExistsError:
            pass
    try:
        os.chmod(path, PRIVATE_FILE)
    except FileNotFoundError:
        pass

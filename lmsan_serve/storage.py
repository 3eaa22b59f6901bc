"""Where a command writes, proved writable before any work.

Permission bits do not tell: root passes `os.access` everywhere, while a read-only mount, a
pseudo-filesystem or a full disk refuses only when a file is created. So each check creates a
file where the output will go and removes it; a command that would write after minutes or hours
of work fails in the first second instead, with one line that says where and why.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import LmsanError


def prove_writable(folder: Path, what: str) -> None:
    """Create and remove a file in `folder`; LmsanError naming `what` if that fails."""
    try:
        fd, name = tempfile.mkstemp(prefix=".lmsan-write-test-", dir=folder)
    except OSError as exc:
        raise LmsanError(f"{what} {folder} is not writable: {exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(name)


def output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder the caller will create (if needed) and write into: it is no file, and its nearest
    existing ancestor, where it will be created, takes a new file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise LmsanError(f"{what} {p} exists and is not a folder")
    parent = p if p.exists() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LmsanError(f"{what} {p} cannot be created: {parent} is not a folder")
    prove_writable(parent, f"{what} {p}: folder" if parent != p else what)
    return p


def output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A file the caller will write (atomically, beside itself): its folder exists and takes a new file."""
    p = Path(path)
    if p.is_dir():
        raise LmsanError(f"{flag} {p} is a folder; give a file name such as sig.safetensors")
    if not p.parent.is_dir():
        raise LmsanError(f"output folder does not exist: {p.parent}")
    prove_writable(p.parent, "output folder")
    return p

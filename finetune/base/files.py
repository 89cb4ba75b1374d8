"""Where things are and writing them safely: the checkout, the cache, free space, and files a reader
sees whole, old or new, never a part (no torch)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from importlib.resources import files
from pathlib import Path

# The clone this package runs from (it is run from its checkout, not installed as a wheel): the
# shipped recipes (recipes/) and the pinned requirements (requirements*.txt) are read from there,
# and torchrun's workers are given it as PYTHONPATH. Package data inside finetune/ (templates,
# model configs, smoke bands) is read through importlib.resources instead.
CHECKOUT = Path(str(files("finetune"))).resolve().parent


def write_atomic(path: Path, text: str) -> Path:
    """Write to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary file behind
        raise
    return path


def write_json(path: Path, document) -> Path:
    return write_atomic(path, json.dumps(document, indent=2) + "\n")


def cache_root() -> Path:
    """Our cache (the tiny model, tokenizers, prepared data, digests): FINETUNE_CACHE, or
    ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def nearest_existing(folder: Path) -> Path:
    """``folder`` itself or its nearest parent that exists: where a folder not made yet will live."""
    return next(p for p in (folder, *folder.parents) if p.exists())


def free_bytes(folder: Path) -> int:
    """Free space on the filesystem ``folder`` is on, or will be on once it is made."""
    return shutil.disk_usage(nearest_existing(folder)).free


def filesystem(folder: Path) -> int:
    """The device ``folder`` is (or will be) on: two folders on one device share its free space."""
    return nearest_existing(folder).stat().st_dev


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file the user handed us, in a few words ("does not exist",
    "is a FIFO (named pipe), not a file", "is a loop of symbolic links"), or None when it is a
    regular file. A pipe or a terminal would block or stream forever; a loop would be told apart
    from a missing file only by its errno."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = [
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device (like a terminal or /dev/null)"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"is {kind}, not a file"


def writable_place(folder: Path) -> str | None:
    """Why nothing could be written at ``folder`` (made where missing), or None: tried by making a
    temporary file in its nearest existing folder, since permission bits do not tell (root, a
    read-only mount, /proc), and nothing is left there."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check."):
            return None
    except OSError as exc:
        return f"{existing} takes no new files ({exc.strerror or exc})"

"""Content digests of files, remembered while a file is unchanged.

Hashing is what keys the prepared-data cache and what a run records about its data and tokenizer.
A 10 GB data file takes seconds to hash even at xxh3's speed (more when it is not in the page
cache), which `plan` cannot spend every time; so, as git does for its index, a digest is stored
with the file's size, modification time (ns) and inode, and computed again only when one of those
changes.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

from finetune.base.files import cache_root, write_atomic

MEMO_ENTRIES = 10_000


def _memo_file() -> Path:
    return cache_root() / "digests.json"


def _stat_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def file_digest(path: Path) -> str:
    """xxh3-128 of the file's bytes (hex)."""
    import xxhash  # a dependency of datasets: ten times sha256's speed

    with path.open("rb") as file:
        if path.stat().st_size == 0:
            return xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return xxhash.xxh3_128(view).hexdigest()


def content_digest(path: Path) -> str:
    """file_digest, from the memo when the file's size, mtime and inode are those it was taken at."""
    path = path.resolve()
    memo_file = _memo_file()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    stat_key = _stat_key(path)
    entry = memo.get(str(path))
    if entry and entry[0] == stat_key:
        return entry[1]
    digest = file_digest(path)
    memo.pop(str(path), None)
    memo[str(path)] = [stat_key, digest]  # last in order: the oldest entries are dropped first
    for stale in list(memo)[:-MEMO_ENTRIES]:
        del memo[stale]
    write_atomic(memo_file, json.dumps(memo))  # a concurrent reader sees the old memo or the new one
    return digest


def folder_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """Every file under ``folder`` (but ``skip``) as {relative path: [size, mtime_ns, digest]}: what
    folder_damage checks a cached folder against before it is used."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in skip:
            stat = path.stat()
            files[name] = [stat.st_size, stat.st_mtime_ns, file_digest(path)]
    return files


def folder_damage(folder: Path, recorded: dict[str, list] | None, every_digest: bool = False) -> str | None:
    """What is wrong with ``folder`` against its record (folder_files), or None. Cheap when nothing
    changed: sizes are always compared, digests only for a file whose size or mtime differs from
    the record (a truncated file, a flipped byte written since), or, with ``every_digest``, for
    every file (a byte flipped with the size and time kept: checked when training starts)."""
    if not recorded:
        return "it records no file digests"
    for name, (size, mtime_ns, digest) in recorded.items():
        path = folder / name
        try:
            stat = path.stat()
        except OSError:
            return f"{name} is missing"
        if stat.st_size != size:
            return f"{name} is {stat.st_size:,} bytes, {size:,} when it was written"
        if (every_digest or stat.st_mtime_ns != mtime_ns) and file_digest(path) != digest:
            return f"{name} changed since it was written (its digest differs)"
    return None

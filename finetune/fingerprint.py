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

from finetune.files import write_atomic

MEMO_ENTRIES = 10_000


def _memo_file() -> Path:
    from finetune.tiny_model import cache_root

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

"""Which failures while writing a run count as a full disk (light: no training here)."""

import errno

from finetune.runs.run_folder import is_disk_full


def test_a_full_disk_is_told_from_other_write_failures(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert is_disk_full(Exception("No space left on device (os error 28)"), tmp_path)  # tokenizers (Rust)
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    # torch's writer says only this; with room on the filesystem it is not a full disk.
    assert not is_disk_full(
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), tmp_path
    )
    assert not is_disk_full(RuntimeError("CUDA error: an illegal memory access"), tmp_path / "not" / "made")

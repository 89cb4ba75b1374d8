"""The run folder: how a run explains itself afterwards and what a resume trusts (no torch).

runs/<recipe>/<timestamp>-<hash>/ holds the resolved recipe, the plan, the environment manifest,
the training log, TensorBoard events, checkpoints and the adapter. Files are written atomically
(a temporary file, then a rename), so a crash leaves either the old file or the new one, never half
of one; a checkpoint counts only once its seal (the size and digest of every file in it) is written,
after the trainer has finished writing the checkpoint itself.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from importlib.resources import files
from pathlib import Path

from finetune.base import distributed, locks
from finetune.base.errors import UserError
from finetune.base.files import free_bytes, write_atomic, write_json
from finetune.base.fingerprint import file_digest
from finetune.recipe.schema import Recipe, load_recipe, recipe_digest

SEAL = "finetune-seal.json"  # written into a checkpoint folder once the checkpoint is complete
PACKAGES = (
    "unsloth",
    "unsloth_zoo",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "tokenizers",
    "pydantic",
)
# Names of environment variables whose values must never be written anywhere in a run folder.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)


class DiskFull(Exception):
    """The disk filled while a run wrote ``what`` into ``folder``: one sentence with the free space
    there, the last sound checkpoint of ``run_dir`` and how to continue."""

    def __init__(self, what: str, folder: Path, run_dir: Path, then: str | None = None):
        free = free_bytes(folder)
        self.checkpoint = latest_checkpoint(run_dir)[0]
        then = then or (
            f"the last sound checkpoint is {self.checkpoint}; free some space, then: "
            f"python runner.py resume {run_dir}"
            if self.checkpoint
            else "no checkpoint was saved; free some space and start the run again"
        )
        where = f"{folder} failed ({free / 2**20:.1f} MiB free there)"
        super().__init__(f"the disk is full: writing {what} into {where}; {then}")


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """No space left in ``folder``: as OSError's errno, or in the text of what the tokenizers library
    (Rust) raises instead; torch's checkpoint writer says only "file write failed", which counts when
    the folder's filesystem is nearly full."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    if "No space left on device" in text or "os error 28" in text:
        return True
    return "file write failed" in text and free_bytes(folder) < 64 * 2**20


@contextmanager
def disk_full_as(what: str, folder: Path, run_dir: Path, then: str | None = None):
    """Turn a full disk while writing ``what`` into DiskFull naming it and the last sound checkpoint
    (or ``then``: what to do, where no checkpoint matters)."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error, folder):
            raise
        raise DiskFull(what, folder, run_dir, then) from None


def write_run_file(path: Path, text: str) -> Path:
    """A file of a run folder, written atomically and with the environment's secrets redacted: a
    run folder gets shared and attached to bug reports, and a token in an override, a command line
    or a log line must not go with it."""
    return write_atomic(path, redact(text))


HISTORY = "history.jsonl"  # each start, resume and ending of the run, one JSON line each


def record_event(run_dir: Path, event: str) -> None:
    """Add a line to the run's history (its report lists them): appended, so a run killed at any
    moment keeps every earlier line."""
    line = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "event": event}) + "\n"
    with (run_dir / HISTORY).open("a") as history:
        history.write(line)


def read_history(run_dir: Path) -> list[dict]:
    """The run's history; a line cut short by a kill (or edited) is left out."""
    path = run_dir / HISTORY
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            events.append(event)
    return events


def write_run_json(path: Path, document) -> Path:
    return write_run_file(path, json.dumps(document, indent=2) + "\n")


def check_writable(path: Path, what: str, folder: bool = False, make: bool = True) -> Path:
    """Fail now, in one sentence, when a file (or ``folder``) the user named could not be written
    later (after a smoke of several minutes, say): a file is a folder, or the folder cannot be made
    or written in. Checked by writing, since permission bits do not tell (root, read-only or
    virtual filesystems). ``make=False``: a folder that will be renamed into place (an export), so
    only the folder holding it is made and written in."""
    if path.is_dir() and not folder:
        raise UserError(f"{what} '{path}' is a folder; name a file")
    parent = path if folder else path.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{what} '{path}': '{blocker}' is a file, not a folder")
    if folder and not make:
        parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-check."):
            pass
    except OSError as exc:
        raise UserError(f"{what} '{path}': cannot write there ({exc.strerror or exc})") from None
    return path


def write_user_file(path: Path, text: str, what: str) -> Path:
    """Write a file the user named: whole or not at all for a file (written beside, then renamed),
    straight into a device or a pipe (never replaced by a file); a failure in one sentence."""
    check_writable(path, what)
    try:
        if path.exists() and not path.is_file():
            with path.open("w") as stream:
                stream.write(text)
        else:
            write_atomic(path, text)
    except OSError as exc:
        why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise UserError(f"{what} '{path}': could not be written ({why}); nothing was written") from None
    return path


def secrets() -> list[str]:
    """Values of the environment's secret-looking variables (HF_TOKEN and the like)."""
    return [value for name, value in os.environ.items() if _SECRET_NAME.search(name) and len(value) >= 8]


def redact(text: str) -> str:
    for value in secrets():
        text = text.replace(value, "<redacted>")
    return text


def make_run_dir(recipe: Recipe, name: str) -> Path:
    """A new folder runs/<recipe>/<timestamp>-<hash>; a run never reuses another run's folder."""
    base = Path(recipe.output.dir) / name / f"{time.strftime('%Y%m%d-%H%M%S')}-{recipe_digest(recipe)[:6]}"
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
        except OSError as exc:  # a file where a folder should be, no permission, a read-only disk
            raise UserError(
                f"output.dir '{recipe.output.dir}': cannot create the run folder {run_dir} ({exc.strerror})"
            ) from None


RUN_LOCK = "run.lock"  # held (flock) by the process training the run; the kernel drops it at its end


def hold_run(run_dir: Path) -> None:
    """Mark ``run_dir`` as trained by this process until it ends, however it ends: a `resume` of a
    run that is still training is refused, instead of two processes training into one folder."""

    if distributed.is_main() and not locks.hold(run_dir / RUN_LOCK):
        pid = locks.holder(run_dir / RUN_LOCK)
        raise UserError(
            f"{run_dir} is still being trained (process {pid}); resuming it now would train it twice "
            "into one folder: wait for it to end, or stop it (Ctrl-C saves a checkpoint) and resume then"
        )


def run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run was started with. Saved with absolute inputs; a run saved before that held
    them relative to the directory it was started from, the current one in the usual case."""
    return load_recipe(run_dir / "recipe.yaml", paths_from=Path.cwd())


def finished_adapter(run_dir: Path) -> tuple[Recipe, Path]:
    """A finished run's recipe and adapter folder, checked whole before anything heavy loads it;
    a clear error for anything else."""
    read_run(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir}: no adapter yet (the run has not finished; `runner.py resume` it first)")
    recipe = run_recipe(run_dir)
    check_adapter(adapter, run_dir)
    return recipe, adapter


# The LoRA settings an adapter's weights are shaped by: a start adapter must have the recipe's.
_ADAPTER_SHAPE = ("r", "alpha", "target_modules", "use_dora", "use_rslora")


def start_adapter(recipe: Recipe) -> Path | None:
    """The adapter model.adapter names (a finished run's), checked before anything heavy loads it:
    trained on this recipe's base model, with its LoRA shape; None when training starts a new one."""
    if recipe.model.adapter is None:
        return None
    run_dir = Path(recipe.model.adapter)
    where = f"model.adapter '{recipe.model.adapter}'"
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{where}: not a run folder (runs/<recipe>/<run>, holding recipe.yaml and adapter/)")
    try:
        parent, adapter = finished_adapter(run_dir)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    if parent.model.name != recipe.model.name:
        raise UserError(
            f"{where}: it was trained on {parent.model.name}, not on this recipe's model.name "
            f"{recipe.model.name}"
        )
    for key in _ADAPTER_SHAPE:
        theirs, ours = getattr(parent.lora, key), getattr(recipe.lora, key)
        if theirs != ours:
            raise UserError(
                f"{where}: its lora.{key} is {theirs!r}, this recipe's {ours!r}; set lora.{key}: {theirs!r}"
            )
    return adapter


def start_adapter_record(recipe: Recipe) -> dict | None:
    """The manifest's lineage of a run started from another's adapter: which run, its recipe and
    its adapter by content."""
    adapter = start_adapter(recipe)
    if adapter is None:
        return None
    parent = run_recipe(adapter.parent)
    return {
        "run": str(adapter.parent),
        "recipe": f"{adapter.parent.parent.name} {parent.version}",
        "recipe_sha256": recipe_digest(parent),
        "adapter_sha256": file_digest(adapter / "adapter_model.safetensors"),
    }


def check_adapter(adapter: Path, run_dir: Path) -> None:
    """The adapter's config is a JSON object, and its weights file holds what its header says
    (a safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes)."""
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    _, problem = _json_object(config, needs=("r", "target_modules"))
    if problem:
        raise UserError(f"{config}: {problem}; {_recovery(run_dir, adapter)}")
    problem = _safetensors_problem(weights)
    if problem:
        raise UserError(f"{weights}: damaged ({problem}); {_recovery(run_dir, adapter)}")


def _recovery(run_dir: Path, adapter: Path) -> str:
    """What to do about a damaged adapter: its last sealed checkpoint's copy, found only now (each
    checkpoint's files are digested to find it, gigabytes for a large model)."""
    last, _ = latest_checkpoint(run_dir)
    if last is None:
        return "train the recipe again"
    return (
        f"{last.relative_to(run_dir)} (sealed) holds the adapter of step {last.name.split('-')[-1]}: copy "
        f"its adapter_config.json and adapter_model.safetensors into {adapter}, or train the recipe again"
    )


def _safetensors_problem(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"cut short: {size:,} bytes, less than its header says"
        try:
            header = json.loads(file.read(length))
            ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError):
            return "its header is not what safetensors writes"
    if 8 + length + max(ends, default=0) != size:
        return f"{size:,} bytes where its header says {8 + length + max(ends, default=0):,}"
    return None


def check_export_folder(out_dir: Path) -> Path:
    """Where `export` writes: a new or empty folder, so no earlier export is overwritten."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"'{out_dir}' already exists and is not empty; nothing was overwritten")
    return check_writable(out_dir, "--out", folder=True, make=False)  # written beside, then renamed


@contextmanager
def folder_whole(folder: Path):
    """Write a folder beside its place (.NAME.partial) and move it there once complete, replacing an
    earlier one: whoever reads ``folder`` finds the old one, none, or the new one whole, however the
    writer ends. What a writer killed midway left beside it is removed by the next."""
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    ordinary_permissions(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def ordinary_permissions(folder: Path) -> None:
    """Every file and folder under ``folder`` with the permissions this user's files get (the
    umask's): a library that writes through a private temporary file leaves its output 0600,
    unreadable to the other users of a machine that the rest of the output is readable to."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_adapter(model, tokenizer, adapter_dir: Path, run_dir: Path) -> None:
    """The trained adapter and its tokenizer, saved whole or not at all: a run killed while saving
    must not look finished, since resume and export trust adapter/ once its config is there."""
    with disk_full_as("the adapter", adapter_dir, run_dir), folder_whole(adapter_dir) as staging:
        # The trained adapter alone: DPO's and KTO's frozen reference copy ("ref") is training's.
        only = {"selected_adapters": ["default"]} if "ref" in getattr(model, "peft_config", {}) else {}
        model.save_pretrained(staging, **only)
        tokenizer.save_pretrained(staging)


@contextmanager
def export_folder(out_dir: Path, run_dir: Path, what: str):
    """The folder an export writes into, made whole (folder_whole): OUT is never a half-written
    model. An export that fails removes what it wrote; one killed leaves its staging folder, which
    the next export to OUT removes, unless the export writing it is still alive (a lock beside it):
    then it is refused."""

    lock = out_dir.with_name(f".{out_dir.name}.lock")
    if not locks.hold(lock):
        pid = locks.holder(lock)
        raise UserError(f"another export (process {pid}) is writing {out_dir}; wait for it to end")
    then = f"nothing of the run changed and nothing was left in {out_dir}; free some space and export again"
    try:
        check_export_folder(out_dir)  # again, under the lock: an export that just ended made OUT
        with disk_full_as(what, out_dir, run_dir, then=then), folder_whole(out_dir) as staging:
            yield staging
    except BaseException:
        shutil.rmtree(out_dir.with_name(f".{out_dir.name}.partial"), ignore_errors=True)
        raise
    finally:
        lock.unlink(missing_ok=True)  # a process that opens it now finds OUT made, or no export
        locks.release(lock)


def _git_commit() -> str | None:
    root = Path(str(files("finetune"))).parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else None


def installed_versions() -> dict[str, str | None]:
    """The installed version of each package of the training stack (None: not installed): in every
    manifest, and what the nightly smoke compares with the pins."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def manifest(recipe: Recipe, fingerprints: dict, device: dict, model: dict) -> dict:
    """What a run ran on and with: enough to explain it, reproduce it, and check a resume."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe_sha256": recipe_digest(recipe),
        "base_model": model,
        "start_adapter": start_adapter_record(recipe),  # lineage: the run its adapter began as
        "fingerprints": fingerprints,
        "device": device,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": installed_versions(),
        "project_commit": _git_commit(),
        "command": sys.argv,
    }


def fingerprint_changes(recorded: dict, current: dict) -> list[str]:
    """One line per input that is not what the run was started with."""
    return [
        f"{key}: was {recorded.get(key)}, now {current.get(key)}"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]


def keep_log_until(log_file: Path, step: int) -> None:
    """A resumed run logs again from its checkpoint on: drop what was logged after it (and a last
    line a killed run may have left half-written)."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("step", 0) <= step:
            kept.append(line)
    write_run_file(log_file, "".join(line + "\n" for line in kept))


def seal_checkpoint(checkpoint: Path) -> None:
    """Record the size and digest of every file, written last: a checkpoint without a valid seal is
    one the trainer did not finish writing (or one damaged since)."""
    files = {
        str(p.relative_to(checkpoint)): [p.stat().st_size, file_digest(p)]
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != SEAL
    }
    write_json(checkpoint / SEAL, {"files": files})


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why this checkpoint cannot be trusted, or None when its seal matches every file."""
    seal = checkpoint / SEAL
    if not seal.is_file():
        return "not sealed (the run stopped while writing it)"
    try:
        files = json.loads(seal.read_text())["files"]
        entries = [(str(name), int(size), str(digest)) for name, (size, digest) in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):  # null, a list, cut
        return "its seal is unreadable"
    for name, size, digest in entries:
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size or file_digest(path) != digest:
            return f"{name} differs from when it was saved"
    return None


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes its integrity check, and a line for each newer one skipped."""
    folder = run_dir / "checkpoints"
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    skipped = []
    for checkpoint in found:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append(f"skipped {checkpoint.name}: {problem}")
    return None, skipped


def check_started_run(run_dir: Path) -> None:
    """A clear error unless ``run_dir`` is a run folder: one that was started (its recipe and
    run.json are written first), trained or not."""
    if not ((run_dir / "recipe.yaml").is_file() and (run_dir / "run.json").is_file()):
        read_run(run_dir)  # says what is missing, or that the record is damaged


def clear_for_restart(run_dir: Path) -> list[str]:
    """Make a run folder with no sound checkpoint ready to train again from the first step: what
    the attempt that died wrote while training goes (unsealed checkpoints, log, TensorBoard events,
    the probe's folder); the recipe, plan, manifest and trackers' records stay. A checkpoint that was
    sealed and has since been damaged is trained work, maybe partly recoverable by hand: it is moved
    to RUN/damaged-checkpoints/, never deleted. Returns what was done, said for the user."""
    damaged = [
        checkpoint
        for checkpoint in sorted((run_dir / "checkpoints").glob("checkpoint-*"))
        if checkpoint.is_dir() and (checkpoint / SEAL).is_file()  # sealed, yet latest_checkpoint refused it
    ]
    if damaged:
        aside = run_dir / "damaged-checkpoints"
        aside.mkdir(exist_ok=True)
        for checkpoint in damaged:
            target, copy = aside / checkpoint.name, 1
            while target.exists():  # one set aside by an earlier restart keeps its place
                copy += 1
                target = aside / f"{checkpoint.name}.{copy}"
            checkpoint.rename(target)
        moved = f"moved {', '.join(c.name for c in damaged)} (damaged since sealed) to {aside.name}/"
    removed = []
    for name in (
        "checkpoints",
        "tensorboard",
        "probe",
        "log.jsonl",
        "samples.json",
        "best.json",
        ".adapter.partial",
    ):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return ([moved] if damaged else []) + ([f"removed {', '.join(removed)}"] if removed else [])


def read_run(run_dir: Path, needs: tuple[str, ...] = ()) -> dict:
    """The manifest of an existing run folder (holding the keys in ``needs``); a clear error when
    it is not one or is damaged."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run folder (no manifest.json)")
    return read_json(path, "the run folder's record is damaged: train the recipe again", needs)


def read_json(path: Path, then: str, needs: tuple[str, ...] = ()) -> dict:
    """A JSON object a run wrote (atomically, so a damaged one was edited or cut by hand), holding
    the keys in ``needs``; otherwise one sentence naming the file, what is wrong, and ``then``:
    what the user can do."""
    document, problem = _json_object(path, needs)
    if problem:
        raise UserError(f"{path}: {problem}; {then}")
    return document


def _json_object(path: Path, needs: tuple[str, ...] = ()) -> tuple[dict, str | None]:
    """(the object, None), or ({}, what is wrong with it)."""
    try:
        document = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        return {}, f"damaged (not valid JSON: {exc})"
    except OSError as exc:
        return {}, f"cannot be read ({exc.strerror})"
    if not isinstance(document, dict):
        return {}, f"damaged (a JSON {type(document).__name__}, not an object)"
    missing = [key for key in needs if key not in document]
    if missing:
        return {}, f"damaged (no {', '.join(map(repr, missing))})"
    return document, None

"""Several processes under torchrun, on this CPU: two processes (torch.distributed's gloo backend,
one per core) train the smoke recipe through Unsloth's CPU path and transformers' own DDP.

What is shown here holds for the CPU; on GPUs the same code runs over NCCL, which is read, not run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import runner

from finetune.runs.run_folder import SEAL, checkpoint_problem, latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "runner.py"]
# One epoch of the 40 sample conversations; a global batch of 6 either way.
EPOCH = [
    "recipes/smoke.yaml",
    "train.max_steps=null",
    "train.num_train_epochs=1",
    "train.warmup_steps=1",
    "train.gradient_accumulation_steps=3",
    "train.save_steps=3",
]


def run(command: list[str], output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, f"output.dir={output}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )


def run_folder(output: Path) -> Path:
    (folder,) = (output / "smoke").iterdir()  # one run folder, whatever the number of processes
    return folder


def losses(folder: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    steps = [entry["step"] for entry in entries if "loss" in entry]
    assert len(steps) == len(set(steps)), "a step was logged twice: more than one rank wrote the log"
    return {entry["step"]: entry["loss"] for entry in entries if "loss" in entry}


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    """The same epoch with 1 sequence per process on 2 processes, and 2 sequences on 1 process."""
    folder = tmp_path_factory.mktemp("ddp")
    two = run([*TORCHRUN, *EPOCH, "train.per_device_train_batch_size=1"], folder / "two")
    assert two.returncode == 0, two.stderr[-4000:]
    one = run([sys.executable, "runner.py", *EPOCH, "train.per_device_train_batch_size=2"], folder / "one")
    assert one.returncode == 0, one.stderr[-4000:]
    return two, run_folder(folder / "two"), run_folder(folder / "one")


def test_two_processes_train_to_the_end_and_only_rank_0_writes(two_and_one):
    two, folder, _ = two_and_one
    assert two.stdout.count("Done: 7 steps") == 1 and two.stdout.count("schedule: cosine") == 1
    assert "7 optimizer steps (40 sequences, 6 per step, 7 steps per epoch, over 2 processes)" in two.stdout
    assert json.loads((folder / "run.json").read_text())["world_size"] == 2
    assert list(losses(folder)) == list(range(1, 8))
    # The trainer's own count under two processes is the plan's: 40 micro-batches of 1 dealt out
    # to 2 processes is 20 each, in accumulation windows of 3: 7 steps (one process: 14).
    final = folder / "checkpoints" / "checkpoint-7"
    assert json.loads((final / "trainer_state.json").read_text())["max_steps"] == 7
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["total_steps"] == 7 and plan["world_size"] == 2 and plan["effective_batch_size"] == 6
    # Each rank's random state is in every checkpoint, and the seal (rank 0's) covers both.
    for checkpoint in (folder / "checkpoints" / "checkpoint-6", final):
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
        assert checkpoint_problem(checkpoint) is None
        assert "rng_state_1.pth" in json.loads((checkpoint / SEAL).read_text())["files"]
    assert (folder / "adapter" / "adapter_model.safetensors").is_file() and (folder / "report.md").is_file()


def test_the_same_global_batch_gives_the_same_loss_at_every_step(two_and_one):
    """The data order is the same by construction: both runs shuffle with the same seeded sampler,
    and accelerate deals the shuffled micro-batches of 1 out in turn, so step k's global batch on
    two processes is the same rows as the one process's batches of 2. The first steps agree to the
    last bit; later ones by about 1e-5: the two halves of each gradient are summed in another order
    (an all-reduce instead of one backward over the batch) and rounded into the bf16 LoRA weights
    Unsloth's CPU path trains. 1e-4 relative is ten times what was measured. On a CPU with bfloat16
    (AMX), where Unsloth computes in bfloat16, a batch of 2 and two of 1 already round differently
    in the first forward: 1e-5 at the first step, up to 7.5e-5 later, so ten times that there."""
    _, two, one = two_and_one
    assert list(losses(two)) == list(losses(one)) == list(range(1, 8))
    dtypes = {json.loads((f / "manifest.json").read_text())["device"]["compute_dtype"] for f in (two, one)}
    first, every = {"float32": (1e-6, 1e-4), "bfloat16": (1e-4, 1e-3)}[dtypes.pop()]
    assert not dtypes, "the two runs computed in different dtypes"
    assert losses(two)[1] == pytest.approx(losses(one)[1], rel=first)
    assert losses(two) == pytest.approx(losses(one), rel=every)


def _children_with_rank(rank: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"RANK={rank}".encode() in environ
            # A worker: torchrun starts the script it was given (runner.py, or the slow-build runner),
            # and the runner's own torchrun starts `python -m finetune ARGS`.
            and any(entry in command for entry in (b"runner.py\0", b"-m\0finetune\0"))
            and b"torch.distributed.run" not in command
        ):
            found.append(int(pid))
    return found


def _wait(condition, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_data_build_longer_than_the_collective_timeout_then_a_sigkill_and_the_job_resumes(tmp_path):
    """One job for two things. Its start: rank 0 builds the prepared data (20 s longer here,
    tests/e2e/slow_build_runner.py) and, in an empty cache, the tiny model, while rank 1 waits its
    turn (distributed.main_first) on the job's store, not in a barrier bounded by the 10 s collective
    timeout: the job trains on, to its checkpoints. Then torchrun and both processes are killed with
    SIGKILL after checkpoint-8; the run resumes on as many processes, and only so, and finishes."""
    env = {
        **ENV,
        "FINETUNE_CACHE": str(tmp_path / "cache"),
        "FINETUNE_COLLECTIVE_TIMEOUT": "10",
        "FINETUNE_SLOW_BUILD": "20",
    }
    recipe = [
        "recipes/smoke.yaml",
        "train.max_steps=12",
        "train.save_steps=4",
        "train.per_device_train_batch_size=1",
    ]
    job = subprocess.Popen(
        [*TORCHRUN[:-1], "tests/e2e/slow_build_runner.py", *recipe, f"output.dir={tmp_path / 'runs'}"],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    _wait(lambda: list(tmp_path.glob(f"runs/smoke/*/checkpoints/checkpoint-8/{SEAL}")), job)
    workers = _children_with_rank(0) + _children_with_rank(1)
    assert len(workers) == 2
    for pid in [job.pid, *workers]:  # torchrun and both processes at once (each in its own session)
        os.kill(pid, signal.SIGKILL)
    job.wait()
    folder = run_folder(tmp_path / "runs")
    assert not (folder / "adapter").exists()
    latest, _ = latest_checkpoint(folder)
    assert 8 <= int(latest.name.split("-")[1]) < 12
    # The same cache (its tiny model and data); the default collective timeout.
    env = {**ENV, "FINETUNE_CACHE": str(tmp_path / "cache")}
    # Another number of processes would change every later global batch: refused, in a second.
    alone = runner("resume", str(folder), env=env)
    assert alone.returncode == 2 and "was started on 2 processes and this is 1" in alone.stderr
    resumed = subprocess.run(
        [*TORCHRUN, "resume", str(folder)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stdout.count(f"resuming from {latest.name}\n") == 1, (latest, resumed.stdout[:300])
    assert resumed.stdout.count("Done: 12 steps") == 1  # rank 0 alone says it
    assert list(losses(folder)) == list(range(1, 13)), resumed.stdout[-1500:] + resumed.stderr[-1500:]
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()


def test_a_rank_that_dies_stops_the_job_at_once_with_one_sentence(tmp_path):
    """--gpus 2 (on this CPU: two gloo processes, as the tiny model trains on a CPU) and rank 1
    killed mid-training: rank 0's collective fails at once, it says so in one sentence, and
    torchrun ends the job."""
    job = subprocess.Popen(
        [sys.executable, "runner.py", "recipes/smoke.yaml", "train.max_steps=200", f"output.dir={tmp_path}",
         "--gpus", "2"],
        cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        log = lambda: next(tmp_path.glob("smoke/*/log.jsonl"), None)  # noqa: E731
        _wait(lambda: log() is not None and log().read_text().count('"loss"') >= 2, job)
        (victim,) = _children_with_rank(1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert time.monotonic() - killed < 60  # seconds, not the collective timeout, and never a hang
    assert job.returncode == 1
    assert (
        "error: another process of this torchrun job (rank 0 of 2 here) stopped in the middle of a step"
        in stderr
    )
    assert "[rank0]: Traceback" not in stderr  # rank 0 says it in one sentence
    assert f"torchrun --nproc_per_node 2 runner.py resume {run_folder(tmp_path)}" in stderr
    assert "error: the job stopped: torchrun exited with 1" in stderr


def test_killing_torchrun_alone_leaves_no_process_training_on(tmp_path):
    """torchrun puts each process in a session of its own; with torchrun killed they get SIGTERM
    from the kernel (distributed._stop_with_torchrun) and stop at the step's end with a checkpoint."""
    job = subprocess.Popen(
        [*TORCHRUN, "recipes/smoke.yaml", "train.max_steps=200", f"output.dir={tmp_path}"],
        cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    log = lambda: next(tmp_path.glob("smoke/*/log.jsonl"), None)  # noqa: E731
    _wait(lambda: log() is not None and log().read_text().count('"loss"') >= 2, job)
    workers = _children_with_rank(0) + _children_with_rank(1)
    assert len(workers) == 2
    job.kill()
    _, stderr = job.communicate()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "processes outlived torchrun"
    checkpoints = list(tmp_path.glob(f"smoke/*/checkpoints/checkpoint-*/{SEAL}"))
    assert checkpoints, f"stopped without the checkpoint SIGTERM saves: {stderr[-3000:]}"


def test_out_of_memory_on_one_rank_ends_the_job_at_once_with_exit_3_and_the_run_resumes(tmp_path):
    """--gpus 2 and rank 1 alone out of memory at step 4: it enters no collective (a checkpoint needs
    rank 0, which waits in the step's own), reports on its rank what to change and exits 3; rank 0's
    step fails as rank 1 leaves; the job ends in seconds, not the collective timeout, with exit 3.
    Nothing trained before the last checkpoint is lost: the run resumes from it and finishes."""
    env = {**ENV, "FINETUNE_INJECT_FAULT": "oom@4:1", "FINETUNE_COLLECTIVE_TIMEOUT": "120"}
    command = [sys.executable, "runner.py", "recipes/smoke.yaml", "train.max_steps=6", "train.save_steps=2"]
    with (tmp_path / "stdout").open("w") as stdout, (tmp_path / "stderr").open("w") as stderr:
        job = subprocess.Popen(
            [*command, f"output.dir={tmp_path}", "--gpus", "2"],
            cwd=ROOT, env=env, text=True, stdout=stdout, stderr=stderr, start_new_session=True,
        )  # fmt: skip
        try:
            log = lambda: next(tmp_path.glob("smoke/*/log.jsonl"), None)  # noqa: E731
            deadline = time.monotonic() + 600
            while job.poll() is None and not (log() and log().read_text().count('"loss"') >= 3):
                assert time.monotonic() < deadline, "timed out"
                time.sleep(0.1)
            step_3 = time.monotonic()  # step 4, the one that runs out, starts
            job.wait(timeout=300)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    assert time.monotonic() - step_3 < 60  # not the 120 s collective timeout
    out = " ".join((tmp_path / "stderr").read_text().split())
    folder = run_folder(tmp_path)
    assert job.returncode == 3, out[-3000:]
    assert (
        "error: out of memory on rank 1 of 2 at step 4 (" in out
        and "not saved: under torchrun a checkpoint needs every process, and the others are mid-step" in out
    )
    assert f"the last sound checkpoint is {folder / 'checkpoints' / 'checkpoint-2'}" in out
    assert "error: the job stopped: rank 1 ran out of memory at step 4 (its report above says" in out
    assert "exitcode : 3" in out  # torchrun's report: rank 1's own code
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out
    # Rank 0, when torchrun's SIGTERM has not ended it first, says why it stopped: not a lost peer.
    assert "stopped in the middle of a step" not in out
    latest, _ = latest_checkpoint(folder)
    assert latest.name == "checkpoint-2" and checkpoint_problem(latest) is None
    assert not (folder / "adapter").exists()
    resumed = subprocess.run(
        [*TORCHRUN, "resume", str(folder)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stdout.count("resuming from checkpoint-2\n") == 1
    assert list(losses(folder)) == list(range(1, 7))


def test_the_gpu_of_a_process_is_the_one_unsloth_loads_it_on(monkeypatch):
    """distributed.device_index against Unsloth's own placement (loader_utils._infer_local_rank)."""
    from unsloth.models import loader_utils

    from finetune.base.distributed import device_index

    for visible in (1, 2, 8):
        monkeypatch.setattr(loader_utils, "_visible_device_count", lambda visible=visible: visible)
        for local_rank in range(10):
            monkeypatch.setenv("LOCAL_RANK", str(local_rank))
            assert device_index(local_rank, visible) == loader_utils._infer_local_rank(None)

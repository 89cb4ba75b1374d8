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

from finetune.run import SEAL, checkpoint_problem, latest_checkpoint

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
    Unsloth's CPU path trains. 1e-4 relative is ten times what was measured."""
    _, two, one = two_and_one
    assert list(losses(two)) == list(losses(one)) == list(range(1, 8))
    assert losses(two)[1] == pytest.approx(losses(one)[1], rel=1e-6)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)


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
            and b"runner.py" in command
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


def test_a_sigkilled_job_resumes_on_as_many_processes_and_finishes(tmp_path):
    recipe = [
        "recipes/smoke.yaml",
        "train.max_steps=24",
        "train.save_steps=4",
        "train.per_device_train_batch_size=1",
    ]
    job = subprocess.Popen(
        [*TORCHRUN, *recipe, f"output.dir={tmp_path}"], cwd=ROOT, env=ENV, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    _wait(lambda: list(tmp_path.glob(f"smoke/*/checkpoints/checkpoint-8/{SEAL}")), job)
    workers = _children_with_rank(0) + _children_with_rank(1)
    assert len(workers) == 2
    for pid in [job.pid, *workers]:  # torchrun and both processes at once (each in its own session)
        os.kill(pid, signal.SIGKILL)
    job.wait()
    folder = run_folder(tmp_path)
    assert not (folder / "adapter").exists()
    latest, _ = latest_checkpoint(folder)
    assert 8 <= int(latest.name.split("-")[1]) < 24
    # Another number of processes would change every later global batch: refused, in a second.
    alone = subprocess.run(
        [sys.executable, "runner.py", "resume", str(folder)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert alone.returncode == 2 and "was started on 2 processes and this is 1" in alone.stderr
    resumed = subprocess.run(
        [*TORCHRUN, "resume", str(folder)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stdout.count(f"resuming from {latest.name}\n") == 1, (latest, resumed.stdout[:300])
    assert list(losses(folder)) == list(range(1, 25)), resumed.stdout[-1500:] + resumed.stderr[-1500:]
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

"""Several GPUs, without running them: the step count, the per-GPU budget, and the refusals that
come before anything heavy. Training under torchrun is tested in tests/e2e/test_torchrun.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

from finetune import lifecycle
from finetune.base import distributed
from finetune.base.errors import UserError
from finetune.models.shapes import Shapes, lora_parameters, shipped_config
from finetune.plan import constants, multi_gpu
from finetune.plan.budget import Workload, plan_budget
from finetune.plan.devices import GPUS
from finetune.plan.job import plan_job
from finetune.plan.schedule import count_optimizer_steps, plan_schedule, steps_per_epoch
from finetune.recipe.schema import load_recipe
from finetune.runs import report, resume
from finetune.runs.outcome import OutOfMemory
from finetune.runs.run_folder import seal_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_steps_follow_accelerates_sharding_of_the_micro_batches():
    # 40 rows in micro-batches of 1 dealt to 2 processes: 20 each, in windows of 3: 7 steps.
    assert steps_per_epoch(40, 1, 3, world_size=2) == 7 == steps_per_epoch(40, 2, 3)
    # 41 micro-batches over 2: each process gets 21 (the last one topped up from the start).
    assert steps_per_epoch(41, 1, 1, world_size=2) == 21
    assert steps_per_epoch(40, 1, 3) == 14  # one process
    train = load_recipe("recipes/smoke.yaml").train
    assert count_optimizer_steps(40, train, world_size=4) == train.max_steps  # max_steps wins
    plan = plan_schedule(40, load_recipe("recipes/code-gen.yaml").train, world_size=2)
    assert plan.effective_batch_size == 2 * 8 * 2 and plan.total_steps == 4 and plan.world_size == 2
    # code-gen: 40 rows in micro-batches of 2 over 2 processes, 10 each, windows of 8: 2 steps, 2 epochs.


def test_each_gpu_holds_the_model_and_the_gradients_are_all_reduced_once_per_step():
    recipe = load_recipe("recipes/code-gen.yaml")
    shapes = Shapes.from_config(shipped_config(recipe.model.name))
    work = Workload([500] * 64, 64, False, 10)
    one = plan_budget(recipe, shapes, GPUS["h100"], work)
    four = plan_budget(recipe, shapes, GPUS["h100"], work, world_size=4)
    gradients = four.memory.terms["DDP gradient buckets"]
    assert gradients == one.memory.terms["LoRA gradients"]
    overhead = constants.constant("allocator_overhead")
    assert four.memory.total == pytest.approx(one.memory.total + gradients * (1 + overhead))
    # 83,886,080 fp32 LoRA gradients: 2 x 3/4 of 335.5 MB over NVLink 4 at 70% of 450 GB/s.
    assert lora_parameters(shapes, 32, recipe.lora.target_modules) == 83_886_080
    expected = 2 * 3 / 4 * 83_886_080 * 4 / (0.7 * 450e9)
    assert four.time.allreduce_seconds == pytest.approx(expected)
    assert four.time.step_seconds == pytest.approx(one.time.step_seconds + expected)
    pcie = plan_budget(recipe, shapes, GPUS["rtx-4090"], work, world_size=2)
    assert pcie.time.link == "PCIe 4.0 x16" and multi_gpu.link("H100 SXM", nodes=2)[1].startswith(
        "a 100 Gb/s"
    )


def test_plan_for_several_gpus_says_what_is_per_gpu(tmp_path):
    out = run_cli(
        "plan", "recipes/code-gen.yaml", "--gpu", "rtx-4090", "--gpus", "2", "--png", str(tmp_path / "p.png")
    )
    assert out.returncode == 0, out.stderr
    assert "4 optimizer steps (38 sequences, 32 per step, 2 steps per epoch, over 2 processes)" in out.stdout
    assert (
        "memory on each of 2 x RTX 4090 with Unsloth" in out.stdout and "DDP gradient buckets" in out.stdout
    )
    assert "the LoRA gradients' all-reduce over PCIe 4.0 x16:" in out.stdout
    document = json.loads(
        run_cli("plan", "recipes/code-gen.yaml", "--gpu", "h100", "--gpus", "2", "--json").stdout.split(
            "\nheavy imports"
        )[0]
    )
    assert document["world_size"] == 2 and document["budget"]["world_size"] == 2
    assert document["budget"]["allreduce_seconds_per_step"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipes/code-gen.yaml", "--gpus", "2"], "--gpus 2: this machine has no GPU that torch can use"),
        (["recipes/smoke.yaml", "--gpus", "1"], "--gpus 1: give 2 or more"),
    ],
)
def test_gpus_that_cannot_be_used_are_refused_at_once(args, message):
    out = run_cli(*args)
    assert out.returncode == 2 and f"error: {message}" in out.stderr and "heavy imports: []" in out.stdout


@pytest.mark.parametrize("verb", [["export", "runs/x"], ["plan", "recipes/smoke.yaml"], ["eval", "runs/x"]])
def test_only_training_runs_under_torchrun(verb):
    out = run_cli(*verb, env_extra={"WORLD_SIZE": "2", "RANK": "0"})
    assert out.returncode == 2 and f"error: {verb[0]} runs in one process" in out.stderr


def test_a_run_resumes_on_as_many_processes_as_it_started_with(tmp_path, monkeypatch):
    recipe = load_recipe("recipes/smoke.yaml")
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    seal_checkpoint(checkpoint)
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 2}))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="started on 2 processes and this is 1: the global batch"):
        resume.resume_point(recipe, tmp_path, force=False)
    found, (warning, resuming) = resume.resume_point(recipe, tmp_path, force=True)
    assert warning.startswith("warning: --force: resuming although") and "2 processes" in warning
    assert (found, resuming) == (checkpoint, "resuming from checkpoint-2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume.resume_point(recipe, tmp_path, force=False) == (checkpoint, ["resuming from checkpoint-2"])
    (tmp_path / "run.json").write_text(json.dumps({}))  # a run from before world sizes were recorded
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resume.resume_point(recipe, tmp_path, force=False) == (checkpoint, ["resuming from checkpoint-2"])


def test_each_process_trains_on_its_local_rank_wrapped_around_the_gpus_it_sees():
    """As Unsloth's loader and accelerate place it (tests/e2e/test_torchrun.py holds it to Unsloth's):
    with one GPU visible per process (Slurm's --gpus-per-task) LOCAL_RANK 3 is an invalid ordinal,
    and every process trains on the one GPU it sees."""
    assert [distributed.device_index(local_rank, 1) for local_rank in range(4)] == [0, 0, 0, 0]
    assert [distributed.device_index(local_rank, 8) for local_rank in (0, 3, 7)] == [0, 3, 7]
    assert distributed.device_index(5, 4) == 1 and distributed.device_index(-1, 4) == 0


# One process of a torchrun job, as far as main_first goes: the job's rendezvous store (torchrun's
# agent serves it) stood in for by a folder, one file a key. Each process notes in the shared log
# when it is ready, and when its main_first block starts and ends; the block of a process that
# others may wait for (LOCAL_RANK 0) waits until every process is ready, so that a wait main_first
# failed to make would show as a block started too early.
MAIN_FIRST_PROCESS = """
import os, sys, time
from pathlib import Path
from urllib.parse import quote
from finetune.base import distributed

keys, log = Path(sys.argv[1]), Path(sys.argv[2])

class FolderStore:
    def check(self, names):
        return all((keys / quote(name, safe="")).exists() for name in names)
    def get(self, name):
        return (keys / quote(name, safe="")).read_bytes()
    def set(self, name, value):
        part = keys / (quote(name, safe="") + ".part")
        part.write_text(value)
        part.rename(keys / quote(name, safe=""))

distributed._job_store = FolderStore
def note(what):
    with log.open("a") as f:
        f.write(f"{what} {distributed.rank()}\\n")

note("ready")
with distributed.main_first():
    note("start")
    if os.environ["LOCAL_RANK"] == "0":
        while log.read_text().count("ready") < distributed.world_size():
            time.sleep(0.05)
        time.sleep(0.5)  # the others are in their wait by now
    note("end")
"""


def test_each_machine_waits_for_rank_0_and_its_other_processes_for_its_first(tmp_path):
    """main_first's turns in a job of two machines of 3 processes (ranks 0-2, 3-5), all started at
    once: rank 0 builds; the second machine's first (rank 3, whose cache may be its own) after it;
    the others after their machine's first. Only the firsts leave word in the job's store."""
    keys, log = tmp_path / "store", tmp_path / "log"
    keys.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MAIN_FIRST_PROCESS, str(keys), str(log)],
            cwd=ROOT,
            env={**os.environ, "WORLD_SIZE": "6", "RANK": str(rank), "LOCAL_RANK": str(rank % 3)},
        )
        for rank in range(6)
    ]
    assert [process.wait(timeout=120) for process in processes] == [0] * 6
    order = log.read_text().splitlines()
    notes = ("ready", "start", "end")
    assert sorted(order) == sorted(f"{what} {rank}" for what in notes for rank in range(6))

    def at(what, rank):
        return order.index(f"{what} {rank}")

    for rank, after in [(1, 0), (2, 0), (3, 0), (4, 3), (5, 3)]:
        assert at("start", rank) > at("end", after), (rank, order)
    words = sorted(os.listdir(keys))
    assert words == ["finetune%2F0%2Fmain-first%2F1%2F0", "finetune%2F0%2Fmain-first%2F1%2F3"], words
    assert {(keys / name).read_text() for name in os.listdir(keys)} == {"done"}


def test_out_of_memory_under_torchrun_names_its_rank_and_the_others_say_one_line(tmp_path, monkeypatch):
    job = plan_job(load_recipe("recipes/smoke.yaml"), "recipes/smoke.yaml", "smoke", GPUS["h100"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    unsaved = "under torchrun a checkpoint needs every process, and the others are mid-step"
    own = report.out_of_memory_report(job, OutOfMemory(4, 125, None, unsaved=unsaved), tmp_path)
    assert (
        own[0]
        == f"out of memory on rank 1 of 2 at step 4 (125 tokens in the micro-batch); not saved: {unsaved}"
    )
    assert "changes predicted to need at least a fifth less memory:" in own  # what to change
    monkeypatch.setenv("RANK", "0")  # rank 0, whose step failed when rank 1 left
    assert report.out_of_memory_report(job, OutOfMemory(4, None, None, rank=1), tmp_path) == [
        "rank 1 of this torchrun job ran out of memory at step 4, so this process (rank 0) stopped too; "
        "rank 1's report says what to change"
    ]


def test_gpus_exits_3_when_a_process_ran_out_of_memory(monkeypatch, capsys):
    """torchrun itself exits 1 whatever its processes did; `--gpus` reads what the one that ran out
    of memory left (distributed.tell_out_of_memory) and exits 3, as a run in one process does."""

    def torchrun_whose_rank_1_ran_out(command, env, preexec_fn):
        Path(env[distributed.OUT_OF_MEMORY_FILE]).write_text("1 4\n")
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(subprocess, "run", torchrun_whose_rank_1_ran_out)
    recipe = load_recipe("recipes/smoke.yaml")
    assert lifecycle.torchrun(2, ["train", "recipes/smoke.yaml"], recipe, "recipes/smoke.yaml") == 3
    assert (
        "error: the job stopped: rank 1 ran out of memory at step 4 (its report above"
        in capsys.readouterr().err
    )
    monkeypatch.setattr(
        subprocess, "run", lambda command, env, preexec_fn: subprocess.CompletedProcess(command, 1)
    )
    assert lifecycle.torchrun(2, ["train", "recipes/smoke.yaml"], recipe, "recipes/smoke.yaml") == 1

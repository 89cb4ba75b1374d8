"""GRPO's rewards for code: each completion scored by running it against its task's tests, confined
(sandbox.py), plus the shipped format and length rewards. No torch here.

The tests reward is partial credit: the share of the task's assert statements that held (all of
them when none failed and the tests ran to their end: what eval passes). The program is the one
eval runs (the task's prompt, the completion, the test code), with every assert of the test code
wrapped to be counted instead of ending the program, and a last line that prints the count after
a random token. Only a program that ran to its end (the sandbox's nonce check) and printed that
line earns its share; a program that hangs, crashes before its tests, or exits early earns 0, and
a count it prints itself is ignored. An assert that runs several times (in a loop) holds when it
held every time, and counts only if the loop ran to its end (see scoring_program).

Each function takes TRL's reward signature (prompts, completions, **columns) and returns one float
a completion; the trainer passes the dataset's `task` column (the task as JSON) with each.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import secrets
import sys

from finetune.base.errors import UserError
from finetune.base.sandbox import Limits, Outcome
from finetune.data.tasks import CHAT_STOPS, RAW_STOPS, Task, task_from_dict


def code_of(task: Task, completion: str, chat: bool) -> str:
    """The completion up to its first stop: what continues the task's prompt (chat: its code
    block's closing fence; raw: the Codex stops), or, for MBPP's whole programs, up to the fence
    alone (a program holds defs and ifs of its own)."""
    stops = CHAT_STOPS if chat or not task.continues_prompt else RAW_STOPS
    cut = min((i for i in (completion.find(stop) for stop in stops) if i >= 0), default=len(completion))
    return completion[:cut]


class _CountAsserts(ast.NodeTransformer):
    """Each assert statement of the test code becomes: try the assert; note that it held, or that
    it failed, and go on. Asserts inside a loop or a nested function are noted as such: when the
    tests end early (an exception outside any assert), theirs may not have run every time."""

    def __init__(self, held: str, failed: str):
        self.held, self.failed = held, failed
        self.count = 0
        self.repeated: list[int] = []
        self._depth = 0

    def _nested(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1
        return node

    visit_For = visit_AsyncFor = visit_While = visit_Lambda = _nested

    def visit_FunctionDef(self, node):
        # check itself is the tests' body; a function defined inside it runs when called
        return self.generic_visit(node) if node.name == "check" and not self._depth else self._nested(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assert(self, node: ast.Assert):
        index = self.count
        self.count += 1
        if self._depth:
            self.repeated.append(index)
        note = lambda name: ast.parse(f"{name}.add({index})").body[0]  # noqa: E731
        handler = ast.ExceptHandler(
            type=ast.Name("BaseException", ast.Load()), name=None, body=[note(self.failed)]
        )
        return ast.copy_location(
            ast.Try(body=[node], handlers=[handler], orelse=[note(self.held)], finalbody=[]), node
        )


def counted_tests(test: str, token: str = "t") -> tuple[str, int, list[int]]:
    """The test code with every assert counted (see _CountAsserts): the code, how many asserts it
    has, and which of them are inside a loop or a nested function."""
    counter = _CountAsserts(f"_held_{token}", f"_failed_{token}")
    tree = ast.fix_missing_locations(counter.visit(ast.parse(test)))
    return ast.unparse(tree), counter.count, counter.repeated


def scoring_program(task: Task, code: str, token: str) -> str:
    """The program whose last line is `token score total`: the task's tests run against ``code``
    (HumanEval: its prompt continued by the code, then check(entry_point); MBPP: the code, then
    its asserts). Tests that ran to their end score the asserts that held, all of them when none
    failed (as eval passes it); tests ended early by an exception outside any assert (the function
    missing, or raising where check calls it before asserting) score only the asserts that held
    and are not inside a loop (a loop's later rounds never ran). The names it keeps its count in
    carry the token, and the builtins it reports with are taken before the candidate's code runs,
    which could rebind them."""
    tests, total, repeated = counted_tests(task.test, token)
    held, failed, done = f"_held_{token}", f"_failed_{token}", f"_done_{token}"
    head = f"{held}, {failed}, {done} = set(), set(), False\n_print_{token}, _len_{token} = print, len\n"
    if task.continues_prompt:
        body = (
            f"{task.prompt}{code}\n\n{tests}\n"
            f"try:\n    check({task.entry_point})\n    {done} = True\nexcept BaseException:\n    pass\n"
        )
    else:  # top-level asserts: each caught on its own; reaching the end is finishing them
        body = f"{code}\n\n{tests}\n{done} = True\n"
    score = (
        f"_score_{token} = ({total} if not {failed} else _len_{token}({held} - {failed})) if {done} "
        f"else _len_{token}({held} - {failed} - {set(repeated) or 'set()'})\n"
    )
    report = f"_print_{token}('\\n{token}', _score_{token}, {total}, flush=True)\n"
    return head + body + score + report


def test_share(outcome: Outcome, token: str) -> float:
    """The share of asserts that held, read from the program's last counting line; 0 unless the
    program ran to its end."""
    if not outcome.passed:
        return 0.0
    for line in reversed(outcome.output.splitlines()):
        parts = line.split()
        if len(parts) == 3 and parts[0] == token and parts[1].isdigit() and parts[2].isdigit():
            held, total = int(parts[1]), int(parts[2])
            return held / total if total else 0.0
    return 0.0


def score_tests(tasks: list[Task], completions: list[str], chat: bool, run) -> list[float]:
    """Each completion's share of its task's tests; ``run(programs) -> outcomes`` runs them confined."""
    tokens = [secrets.token_hex(8) for _ in completions]
    programs = [
        scoring_program(task, code_of(task, completion, chat), token)
        for task, completion, token in zip(tasks, completions, tokens, strict=True)
    ]
    return [test_share(o, t) for o, t in zip(run(programs), tokens, strict=True)]


def format_score(completion: str) -> float:
    """1 when the answer's one code block (opened by the prompt) is closed once and the answer ends
    there; else 0."""
    return 1.0 if completion.count("```") == 1 and completion.rstrip().endswith("```") else 0.0


def length_score(tokens: int, target: int, most: int) -> float:
    """0 up to ``target`` tokens, falling linearly to -1 at ``most`` (max_completion_length)."""
    if tokens <= target or most <= target:
        return 0.0
    return -min(1.0, (tokens - target) / (most - target))


def tasks_of(column: list[str]) -> list[Task]:
    return [task_from_dict(json.loads(entry)) for entry in column]


def completion_text(completion) -> str:
    """TRL passes text completions as strings, conversational ones as a one-message list."""
    if isinstance(completion, list):
        return "".join(str(message.get("content", "")) for message in completion)
    return str(completion)


DEFAULT_LIMITS = Limits(wall_seconds=10.0, cpu_seconds=10)


# What TRL 1.15 passes every reward function (by name), with the dataset's columns.
REWARD_ARGUMENTS = (
    "prompts", "completions", "completion_ids", "task", "source", "trainer_state", "log_extra", "log_metric"
)  # fmt: skip


def user_reward(spec: str):
    """The user's reward function named module:function, imported from the current directory or
    the Python path; one sentence when it cannot be, or does not take TRL's arguments."""
    module_name, _, function_name = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # as `python -m` would: the user's module in the directory run from
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's code: what it raises on import is theirs to see
        raise UserError(
            f"rewards: {spec}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"rewards: {spec}: {module_name} has no function {function_name}")
    try:
        inspect.signature(function).bind(**dict.fromkeys(REWARD_ARGUMENTS))
    except (TypeError, ValueError):
        raise UserError(
            f"rewards: {spec} must take TRL's reward arguments by name: (prompts, completions, "
            "completion_ids, **kwargs)"
        ) from None
    return function

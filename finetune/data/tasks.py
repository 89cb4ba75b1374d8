"""Coding tasks with tests, for GRPO: read, checked, and turned into the prompt the model answers.

Two shapes are read (either through data.columns): HumanEval's (prompt: the function's start,
test: a `check(candidate)` function, entry_point: the function's name), whose completion continues
the prompt; and MBPP's (text: the problem in words, test_list: assert statements), whose completion
is the whole program. Each test is an assert statement: the tests reward counts how many hold.

The prompt is eval's (evaluate/evaluation.py's `request`): in chat mode, lm-eval's
humaneval_instruct instruction and the answer begun in a code block; in raw mode the function's
start as it is. So a run trains on the prompt its evaluation asks, and its tokens are the ones the
audit shows (rendered here, through the same chat template). No torch here.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass

from finetune.base.errors import UserError
from finetune.data.tokenize import IGNORE_INDEX, KEPT, TOO_LONG

HUMANEVAL_FIELDS = ("prompt", "test", "entry_point")
MBPP_FIELDS = ("text", "test_list")
# lm-eval-harness's humaneval_instruct prompt, and where an answer's code ends: eval's and GRPO's
# (evaluate/evaluation.py and train/rewards.py import them from here).
INSTRUCTION = (
    "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{}\n```\n"
)
ANSWER_START = "Here is the completed function:\n```python\n"
MBPP_ANSWER_START = "```python\n"
CHAT_STOPS = ("```",)  # a chat answer's code ends at its block's closing fence
RAW_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's


@dataclass(frozen=True)
class Task:
    source: str  # file:line, for messages
    task_id: str
    prompt: str  # HumanEval: the function's start; MBPP: the problem in words
    test: str  # HumanEval: the check function; MBPP: the asserts, one a line
    entry_point: str | None  # HumanEval's; None for MBPP's whole programs

    @property
    def continues_prompt(self) -> bool:
        """Whether the completion continues the prompt's code (HumanEval) or is the whole program."""
        return self.entry_point is not None

    def request(self, chat: bool) -> tuple[list[dict] | None, str]:
        """What the model is given: (chat messages or None, the text that follows them)."""
        if self.continues_prompt:
            if not chat:
                return None, self.prompt
            message = INSTRUCTION.format(self.prompt.strip())
            return [{"role": "user", "content": message}], ANSWER_START + self.prompt
        message = f"{self.prompt.strip()}\nYour code should pass these tests:\n```python\n{self.test}```\n"
        return ([{"role": "user", "content": message}], MBPP_ANSWER_START) if chat else (None, message)

    def conversation(self) -> tuple[None, list[tuple[str, bool]]]:
        """As an SFT row's (messages, segments), untrained: what the HumanEval check reads."""
        return None, [(f"{self.prompt}\n{self.test}", False)]

    def as_dict(self) -> dict:
        return asdict(self)


def task_from_dict(entry: dict) -> Task:
    return Task(**entry)


def count_tests(test: str) -> int:
    """The assert statements of a task's test code (each one test)."""
    return sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(test)))


def read_task(row: dict, where: str) -> Task:
    """A task row of either shape; one sentence naming the row and the field for a bad one."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a task is a JSON object with {', '.join(HUMANEVAL_FIELDS)}")
    if all(field in row for field in MBPP_FIELDS) and "entry_point" not in row:
        tests = row["test_list"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise UserError(f"{where}: test_list must be a list of assert statements (text)")
        text, test, entry_point = row["text"], "".join(t.rstrip("\n") + "\n" for t in tests), None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: text must hold the problem (text)")
    else:
        missing = [f for f in HUMANEVAL_FIELDS if not isinstance(row.get(f), str) or not row[f].strip()]
        if missing:
            raise UserError(
                f"{where}: a task needs {', '.join(HUMANEVAL_FIELDS)} (HumanEval's shape) or "
                f"{', '.join(MBPP_FIELDS)} (MBPP's) as text; missing {missing[0]} "
                "(map other names with data.columns)"
            )
        text, test, entry_point = row["prompt"], row["test"], row["entry_point"]
        if not entry_point.isidentifier():
            raise UserError(f"{where}: entry_point {entry_point!r} is not a function name")
    try:
        tests = count_tests(test)
        tree = ast.parse(test)
    except SyntaxError as exc:
        raise UserError(
            f"{where}: its test code is not valid Python (line {exc.lineno}: {exc.msg})"
        ) from None
    if not tests:
        raise UserError(f"{where}: its test code holds no assert statement, so no test to pass")
    if entry_point is not None and not any(
        isinstance(node, ast.FunctionDef) and node.name == "check" for node in tree.body
    ):
        raise UserError(f"{where}: its test code defines no check(candidate) function (HumanEval's shape)")
    task_id = row.get("task_id")
    task_id = str(task_id) if isinstance(task_id, (str, int)) and str(task_id).strip() else where
    return Task(where, task_id, text, test, entry_point)


@dataclass(frozen=True)
class TokenizedTask:
    source: str
    prompt_ids: list[int]
    prompt_text: str  # the rendered prompt whose tokens prompt_ids are (what the trainer is given)


def tokenize_task(tokenizer, task: Task, chat: bool) -> TokenizedTask:
    """The prompt's tokens through the chat template (chat) or after the BOS token (raw)."""
    from jinja2.exceptions import TemplateError

    messages, text = task.request(chat)
    if messages is None:
        bos = tokenizer.special_tokens.get("bos_token") or ""
        rendered = bos + text
    else:
        try:
            rendered = tokenizer.render(messages, add_generation_prompt=True) + text
        except TemplateError as exc:
            raise UserError(f"{task.source}: the chat template rejects this task's prompt: {exc}") from None
    ids = tokenizer.encode(rendered).ids
    return TokenizedTask(task.source, ids, rendered)


def tokenize_task_batch(batch: dict, tokenizer, chat: bool, longest_prompt: int) -> dict:
    """datasets.map over raw task rows: the prompt's tokens and text, and whether it fits."""
    out: dict[str, list] = {
        k: [] for k in ("task", "input_ids", "labels", "prompt", "length", "status", "trained")
    }
    for raw in batch["pair"]:
        out["task"].append(raw)
        tokenized = tokenize_task(tokenizer, task_from_dict(json.loads(raw)), chat)
        n = len(tokenized.prompt_ids)
        out["input_ids"].append(tokenized.prompt_ids)
        out["labels"].append([IGNORE_INDEX] * n)  # a prompt is never trained; the completions are
        out["prompt"].append(tokenized.prompt_text)
        out["length"].append(n)
        out["status"].append(KEPT if n <= longest_prompt else TOO_LONG)
        out["trained"].append(0)
    return out

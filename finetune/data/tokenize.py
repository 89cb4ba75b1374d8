"""Conversations into the token ids and labels the trainer trains on, without torch.

We render and tokenize ourselves (the model's own ``tokenizer.json`` through the Rust `tokenizers`
library, its chat template through jinja2 set up as transformers sets it up) and hand the trainer
finished ``input_ids`` and ``labels``. So the rows that are dropped or truncated, the tokens that are
trained, and the sequence lengths behind the step count and the memory plan are all known before
launch, and they are exactly what the trainer sees: it has nothing left to decide.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources import files
from pathlib import Path

from finetune.base import locks
from finetune.base.errors import UserError
from finetune.base.files import cache_root
from finetune.base.fingerprint import content_digest
from finetune.base.internals import hub_cached_file
from finetune.base.processes import child_setup
from finetune.data.rows import Conversation
from finetune.models.tiny_model import TINY_MODEL_NAME, tokenizer_digest

IGNORE_INDEX = -100  # label of a token that is not trained (PyTorch's cross-entropy ignore_index)
# Models whose tokenizer and chat template are Llama 3.1 Instruct's, built in from `llama-models`:
# planning them needs no download.
_LLAMA3_NAME = re.compile(r"llama-?3\.[123]", re.IGNORECASE)


@dataclass(frozen=True)
class Example:
    source: str
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class Prepared:
    """The training rows as the trainer will see them, and what happened to the others."""

    examples: list[Example]
    dropped_too_long: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    dropped_untrained: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # preference pairs' report (data/preference.py)

    def record(self, example: Example, status: str) -> None:
        """Keep a trained row, or note a dropped one under what happened to it."""
        if status in (KEPT, TRUNCATED):
            self.examples.append(example)
        if status in (TRUNCATED, UNTRAINED):
            self.truncated.append(example.source)
        if status == TOO_LONG:
            self.dropped_too_long.append(example.source)
        if status == UNTRAINED:
            self.dropped_untrained.append(example.source)

    @property
    def lengths(self) -> list[int]:
        return [len(example.input_ids) for example in self.examples]

    def report(self, max_seq_length: int) -> list[str]:
        """One line per kind of row that was changed or left out; none when all rows went in whole."""
        lines = []
        for rows, what in (
            (self.dropped_too_long, f"dropped: longer than max_seq_length {max_seq_length} tokens"),
            (self.truncated, f"truncated to max_seq_length {max_seq_length} tokens"),
            (self.dropped_untrained, "dropped: no trained token left after truncation"),
        ):
            if rows:
                shown = ", ".join(rows[:3]) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")
                lines.append(f"{len(rows)} rows {what} ({shown})")
        return lines + self.notes


def compile_template(text: str, where: str):
    """A chat template compiled in the environment transformers' apply_chat_template uses; a
    syntax error is one sentence naming ``where`` and the line."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation.make(), jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    )
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"{where}:{exc.lineno}: not a valid chat template ({exc.message})") from None


class _Generation:
    """jinja2 extension for the `{% generation %}` tag some chat templates use: render the body."""

    @staticmethod
    def make():
        from jinja2 import nodes
        from jinja2.ext import Extension

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        return Generation


@dataclass
class ChatTokenizer:
    """A model's tokenizer and chat template, loaded without transformers."""

    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the template sees them
    origin: str

    def __post_init__(self):
        self._template = compile_template(self.chat_template, self.origin)

    # Sent to datasets.map's worker processes: the compiled template does not pickle; recompile it.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_template"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The template's text; a template that rejects the conversation raises jinja2's TemplateError."""
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def encode(self, text: str):
        """Token ids and character offsets; special tokens in the text are matched, none are added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(self.special_tokens["eos_token"])


def _raise_template_error(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def load_tokenizer_dir(directory: Path, origin: str) -> ChatTokenizer:
    """tokenizer.json plus the chat template and special tokens from tokenizer_config.json."""
    from tokenizers import Tokenizer

    config = json.loads((directory / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if (directory / "chat_template.jinja").is_file():  # transformers 5 saves the template on its own
        template = (directory / "chat_template.jinja").read_text()
    if not template:
        raise UserError(f"the tokenizer in {directory} has no chat template to render conversations with")
    specials = {
        key: value if isinstance(value, str) else value.get("content")
        for key, value in config.items()
        if key.endswith("_token") and value
    }
    return ChatTokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")), template, specials, origin)


def llama3_tokenizer_dir() -> Path:
    """Llama 3.1 Instruct's tokenizer files, converted once from `llama-models` into the cache.

    The conversion needs transformers (and so torch); it runs in a child process so that planning
    in this one stays light.
    """

    directory = cache_root() / f"llama-3-tokenizer-{tokenizer_digest()}"
    if (directory / "tokenizer.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with locks.exclusive(directory.with_name(directory.name + ".build.lock")):  # one process converts
        if (directory / "tokenizer.json").is_file():
            return directory
        for debris in directory.parent.glob(f"{directory.name}.tmp*"):  # a conversion killed midway
            shutil.rmtree(debris, ignore_errors=True)
        # Output captured: `plan --json` prints JSON alone on stdout.
        subprocess.run(
            [sys.executable, "-m", "finetune.models.tiny_model", "--tokenizer", str(directory)],
            check=True,
            capture_output=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            preexec_fn=child_setup(),
        )
    return directory


TEMPLATES_DIR = files("finetune.data") / "templates"


def resolve_chat_template(name: str) -> str:
    """A shipped template by name (finetune/data/templates/NAME.jinja) or a .jinja file by path."""
    shipped = TEMPLATES_DIR / f"{name}.jinja"
    path = shipped if shipped.is_file() else Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))
        raise UserError(f"data.chat_template '{name}' is neither a shipped template ({known}) nor a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); a chat template is text"
        ) from None
    if "\0" in text:
        raise UserError(
            f"{path}:{text[: text.index(chr(0))].count(chr(10)) + 1}: a NUL byte; a chat template is text"
        )
    compile_template(text, str(path))  # its syntax, checked now with its own name
    return text


@dataclass(frozen=True)
class TokenizerSource:
    """Where a model's tokenizer files are, found without loading them."""

    origin: str
    directory: Path | None  # None: the built-in Llama 3.1 tokenizer, written on first load

    def digest(self) -> str:
        """Changes whenever the files (or the built-in tokenizer's definition) do."""

        if self.directory is None:
            return f"built-in-{tokenizer_digest()}"

        files = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
        return json.dumps(
            [
                [name, content_digest(self.directory / name)]
                for name in files
                if (self.directory / name).is_file()
            ]
        )

    def load(self) -> ChatTokenizer:
        return load_tokenizer_dir(self.directory or llama3_tokenizer_dir(), self.origin)


def locate_tokenizer(model_name: str) -> TokenizerSource | None:
    """The recipe model's tokenizer, from disk only: a local folder, the Hugging Face cache, or the
    built-in Llama 3 one; None when it cannot be had without a download."""

    local = Path(model_name)
    if (local / "tokenizer.json").is_file():
        return TokenizerSource(str(local), local)
    if model_name != TINY_MODEL_NAME and not local.exists():
        cached = hub_cached_file(model_name, "tokenizer.json")
        if cached is not None:
            return TokenizerSource(f"{model_name} (local Hugging Face cache)", cached.parent)
    if model_name == TINY_MODEL_NAME or _LLAMA3_NAME.search(model_name):
        return TokenizerSource("Llama 3.1 Instruct (built in)", None)
    return None


def tokenize_conversations(
    tokenizer: ChatTokenizer, conversations: list[Conversation], responses_only: bool
) -> list[Example | UserError]:
    """input_ids and labels of each conversation; with ``responses_only`` only the assistant turns
    (their text and the end-of-turn token after it) are trained, every one of them. The texts are
    encoded in one batch (the Rust tokenizer spreads a batch over the cores); a row the template
    rejects gets its error instead."""
    chat = [(k, c) for k, c in enumerate(conversations) if c.segments is None]
    results: list[Example | UserError | None] = [None] * len(conversations)
    rendered = []
    for k, conversation in chat:
        try:
            rendered.append((k, *_chat_text(tokenizer, conversation, responses_only)))
        except UserError as exc:
            results[k] = exc
    encodings = tokenizer.tokenizer.encode_batch([text for _, text, _ in rendered], add_special_tokens=False)
    for (k, _text, spans), encoding in zip(rendered, encodings, strict=True):
        results[k] = _chat_example(conversations[k].source, encoding, spans, responses_only)
    raw = [(k, c) for k, c in enumerate(conversations) if c.segments is not None]
    pieces = [piece for _, c in raw for piece, _ in c.segments]
    piece_ids = iter(tokenizer.tokenizer.encode_batch(pieces, add_special_tokens=False) if pieces else [])
    for k, conversation in raw:
        encoded = [(next(piece_ids).ids, trained) for _, trained in conversation.segments]
        results[k] = _raw_example(tokenizer, conversation.source, encoded, responses_only)
    return results


def _chat_example(source: str, encoding, spans: list[tuple[int, int]], responses_only: bool) -> Example:
    ids = list(encoding.ids)
    if not responses_only:
        return Example(source, ids, list(ids))
    # A token is trained when it starts inside an assistant turn; token starts only ever increase.
    starts = [start for start, _end in encoding.offsets]
    labels = [IGNORE_INDEX] * len(ids)
    for lo, hi in spans:
        first, end = bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi)
        labels[first:end] = ids[first:end]
    return Example(source, ids, labels)


def _raw_example(
    tokenizer: ChatTokenizer, source: str, encoded: list[tuple[list[int], bool]], responses_only: bool
) -> Example:
    """BOS, each segment tokenized on its own, then EOS (trained, so the model learns to stop).

    Tokenizing the prompt apart from the completion is what inference does (the prompt alone is
    encoded, then generation continues), and it keeps the trained/untrained boundary exact where a
    joint encoding could merge the prompt's last characters with the completion's first.
    """
    bos = tokenizer.special_tokens.get("bos_token")
    ids = [tokenizer.tokenizer.token_to_id(bos)] if bos else []
    labels = [IGNORE_INDEX] * len(ids)
    for piece_ids, trained in encoded:
        ids += piece_ids
        labels += piece_ids if trained or not responses_only else [IGNORE_INDEX] * len(piece_ids)
    ids.append(tokenizer.eos_id)
    labels.append(tokenizer.eos_id)
    return Example(source, ids, labels)


def _chat_text(
    tokenizer: ChatTokenizer, conversation: Conversation, responses_only: bool
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and (when only responses are trained) the character spans of its
    assistant turns."""
    from jinja2.exceptions import TemplateError

    messages = conversation.messages
    try:
        text = tokenizer.render(messages)
    except TemplateError as exc:  # e.g. a template that allows no system message, or strict alternation
        raise UserError(
            f"{conversation.source}: the chat template rejects this conversation: {exc}"
        ) from None
    if not responses_only:
        return text, []
    # Each assistant turn is the text the template adds after the prompt that asks for it.
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prompt = tokenizer.render(messages[:i], add_generation_prompt=True)
            turn = tokenizer.render(messages[: i + 1])
        except TemplateError as exc:  # e.g. Llama 3's template cannot render the empty prompt before
            # a conversation that opens with the assistant
            raise UserError(
                f"{conversation.source}: the chat template cannot render the conversation before "
                f"messages[{i}] ({exc}), so that assistant turn cannot be located; start the conversation "
                "with a user or system turn, or set data.train_on_responses_only: false"
            ) from None
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise UserError(
                f"{conversation.source}: the chat template does not render this conversation turn by turn, "
                "so its assistant turns cannot be located; set data.train_on_responses_only: false"
            )
        spans.append((len(prompt), len(turn)))
    return text, spans


# What the length policy did with a row: kept whole or truncated (both trained), or dropped.
KEPT, TRUNCATED, TOO_LONG, UNTRAINED = "kept", "truncated", "too long", "untrained"


def length_policy(example: Example, max_seq_length: int, overlong: str) -> tuple[Example, str]:
    """The row as trained and what happened to it (KEPT, TRUNCATED, TOO_LONG or UNTRAINED)."""
    if len(example.input_ids) <= max_seq_length:
        return example, KEPT
    if overlong == "error":
        raise UserError(
            f"{example.source}: {len(example.input_ids)} tokens, longer than max_seq_length "
            f"{max_seq_length}; raise model.max_seq_length, or set data.overlong: drop or truncate"
        )
    if overlong == "drop":
        return example, TOO_LONG
    # Keep the start, as transformers does; the end of the answer (and its EOS) is lost.
    example = Example(example.source, example.input_ids[:max_seq_length], example.labels[:max_seq_length])
    return example, TRUNCATED if example.trained_tokens else UNTRAINED


def nothing_left_error(source: str, report: list[str]) -> UserError:
    return UserError(f"{source.rsplit(':', 1)[0]}: no row is left to train on; " + "; ".join(report))


def count_packed_sequences(lengths: list[int], seq_length: int) -> int:
    """How many sequences best-fit-decreasing packing makes (TRL's "bfd" packing_strategy).

    Longest first, each into the open sequence with the least room that still fits it, else into a
    new one. Which of several equally full sequences takes it cannot change the count, so the count
    equals TRL's whatever its tie-breaking.
    """
    room_sizes: list[int] = []  # sorted free space of the open sequences (with repeats)
    count = 0
    for length in sorted((min(n, seq_length) for n in lengths if n > 0), reverse=True):
        k = bisect.bisect_left(room_sizes, length)
        if k < len(room_sizes):
            room = room_sizes.pop(k)
        else:
            room, count = seq_length, count + 1
        if room - length > 0:
            bisect.insort(room_sizes, room - length)
    return count

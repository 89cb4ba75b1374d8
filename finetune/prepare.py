"""Conversations into the token ids and labels the trainer trains on, without torch.

We render and tokenize ourselves (the model's own ``tokenizer.json`` through the Rust `tokenizers`
library, its chat template through jinja2 set up as transformers sets it up) and hand the trainer
finished ``input_ids`` and ``labels``. So the rows that are dropped or truncated, the tokens that are
trained, and the sequence lengths behind the step count and the memory plan are all known before
launch, and they are exactly what the trainer sees: it has nothing left to decide.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from finetune.data import Conversation, expand_files
from finetune.recipe import DataSection, RecipeError

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
        return lines


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
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The same environment transformers' apply_chat_template compiles templates in.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation.make(), jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
            json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )
        )
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(self.chat_template)

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
        raise RecipeError(f"the tokenizer in {directory} has no chat template to render conversations with")
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
    from finetune.tiny_model import cache_root, tokenizer_digest

    directory = cache_root() / f"llama-3-tokenizer-{tokenizer_digest()}"
    if not (directory / "tokenizer.json").is_file():
        # Output captured: `plan --json` prints JSON alone on stdout.
        subprocess.run(
            [sys.executable, "-m", "finetune.tiny_model", "--tokenizer", str(directory)],
            check=True,
            capture_output=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
    return directory


def hub_cached_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub model already in the local Hugging Face cache, or None.

    Reads the cache layout (models--ORG--NAME/refs/main -> snapshots/REV/FILE) directly: the
    library's own lookup imports a quarter of a second of modules, which `plan` cannot afford.
    """
    from huggingface_hub import constants

    if repo_id.count("/") != 1 or any(part in ("", ".", "..") for part in repo_id.split("/")):
        return None
    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return None
    found = repo_dir / "snapshots" / ref.read_text().strip() / filename
    return found if found.is_file() else None


TEMPLATES_DIR = Path(__file__).parent / "templates"


def resolve_chat_template(name: str) -> str:
    """A shipped template by name (finetune/templates/NAME.jinja) or a .jinja file by path."""
    shipped = TEMPLATES_DIR / f"{name}.jinja"
    path = shipped if shipped.is_file() else Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))
        raise RecipeError(f"data.chat_template '{name}' is neither a shipped template ({known}) nor a file")
    return path.read_text(encoding="utf-8")


def find_tokenizer(model_name: str, chat_template: str | None = None) -> ChatTokenizer | None:
    """The recipe model's tokenizer, from disk only: a local folder, the Hugging Face cache, or the
    built-in Llama 3 one; None when it cannot be had without a download. ``chat_template`` (a
    shipped name or a file) replaces the tokenizer's own template."""
    found = _find_tokenizer(model_name)
    if found is None or chat_template is None:
        return found
    return replace(
        found,
        chat_template=resolve_chat_template(chat_template),
        origin=f"{found.origin}, template {chat_template}",
    )


def _find_tokenizer(model_name: str) -> ChatTokenizer | None:
    from finetune.tiny_model import TINY_MODEL_NAME

    local = Path(model_name)
    if (local / "tokenizer.json").is_file():
        return load_tokenizer_dir(local, str(local))
    if model_name != TINY_MODEL_NAME and not local.exists():
        cached = hub_cached_file(model_name, "tokenizer.json")
        if cached is not None:
            return load_tokenizer_dir(cached.parent, f"{model_name} (local Hugging Face cache)")
    if model_name == TINY_MODEL_NAME or _LLAMA3_NAME.search(model_name):
        return load_tokenizer_dir(llama3_tokenizer_dir(), "Llama 3.1 Instruct (built in)")
    return None


def tokenize_conversation(
    tokenizer: ChatTokenizer, conversation: Conversation, responses_only: bool
) -> Example:
    """input_ids and labels of one conversation; with ``responses_only`` only the assistant turns
    (their text and the end-of-turn token after it) are trained, every one of them."""
    if conversation.segments is not None:
        return _raw_example(tokenizer, conversation, responses_only)
    text, spans = _chat_text(tokenizer, conversation)
    encoding = tokenizer.encode(text)
    ids = list(encoding.ids)
    if not responses_only:
        return Example(conversation.source, ids, list(ids))
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, _end) in enumerate(encoding.offsets):
        if any(lo <= start < hi for lo, hi in spans):
            labels[k] = ids[k]
    return Example(conversation.source, ids, labels)


def _raw_example(tokenizer: ChatTokenizer, conversation: Conversation, responses_only: bool) -> Example:
    """BOS, each segment tokenized on its own, then EOS (trained, so the model learns to stop).

    Tokenizing the prompt apart from the completion is what inference does (the prompt alone is
    encoded, then generation continues), and it keeps the trained/untrained boundary exact where a
    joint encoding could merge the prompt's last characters with the completion's first.
    """
    bos = tokenizer.special_tokens.get("bos_token")
    ids = [tokenizer.tokenizer.token_to_id(bos)] if bos else []
    labels = [IGNORE_INDEX] * len(ids)
    for piece, trained in conversation.segments:
        piece_ids = list(tokenizer.encode(piece).ids)
        ids += piece_ids
        labels += piece_ids if trained or not responses_only else [IGNORE_INDEX] * len(piece_ids)
    ids.append(tokenizer.eos_id)
    labels.append(tokenizer.eos_id)
    return Example(conversation.source, ids, labels)


def _chat_text(tokenizer: ChatTokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    from jinja2.exceptions import TemplateError

    messages = conversation.messages
    try:
        text = tokenizer.render(messages)
    except TemplateError as exc:  # e.g. a template that allows no system message, or strict alternation
        raise RecipeError(
            f"{conversation.source}: the chat template rejects this conversation: {exc}"
        ) from None
    # Each assistant turn is the text the template adds after the prompt that asks for it.
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.render(messages[:i], add_generation_prompt=True)
        turn = tokenizer.render(messages[: i + 1])
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise RecipeError(
                f"{conversation.source}: the chat template does not render this conversation turn by turn, "
                "so its assistant turns cannot be located; set data.train_on_responses_only: false"
            )
        spans.append((len(prompt), len(turn)))
    return text, spans


def prepare(
    conversations: list[Conversation], tokenizer: ChatTokenizer, data: DataSection, max_seq_length: int
) -> Prepared:
    """Tokenize, then apply the recipe's policy to rows longer than ``max_seq_length``."""
    prepared = Prepared(examples=[])
    for conversation in conversations:
        example = tokenize_conversation(tokenizer, conversation, data.train_on_responses_only)
        if len(example.input_ids) > max_seq_length:
            if data.overlong == "error":
                raise RecipeError(
                    f"{example.source}: {len(example.input_ids)} tokens, longer than max_seq_length "
                    f"{max_seq_length}; raise model.max_seq_length, or set data.overlong: drop or truncate"
                )
            if data.overlong == "drop":
                prepared.dropped_too_long.append(example.source)
                continue
            # Keep the start, as transformers does; the end of the answer (and its EOS) is lost.
            example = Example(
                example.source, example.input_ids[:max_seq_length], example.labels[:max_seq_length]
            )
            prepared.truncated.append(example.source)
            if example.trained_tokens == 0:
                prepared.dropped_untrained.append(example.source)
                continue
        prepared.examples.append(example)
    if conversations and not prepared.examples:
        raise RecipeError(
            f"{conversations[0].source.rsplit(':', 1)[0]}: no row is left to train on; "
            + "; ".join(prepared.report(max_seq_length))
        )
    return prepared


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


# Bump when preparation changes what it produces, so cached summaries are not trusted across it.
_PREPARE_VERSION = "2"


@dataclass(frozen=True)
class DataPlan:
    """What the training data will be, as far as planning needs it."""

    rows: int  # rows in the training files
    lengths: list[int] | None  # token length of every row that is trained on; None without a tokenizer
    report: list[str]  # rows dropped or truncated, one line per kind
    tokenizer: str  # where the tokenizer came from, or why there is none
    packing: bool
    max_seq_length: int

    @property
    def sequences(self) -> int:
        """Sequences the trainer iterates over: rows kept, or the packed sequences made from them."""
        if self.lengths is None:
            return self.rows
        if self.packing:
            return count_packed_sequences(self.lengths, self.max_seq_length)
        return len(self.lengths)

    def describe(self) -> list[str]:
        if self.lengths is None:
            return [
                f"data: {self.rows} rows; token lengths unknown ({self.tokenizer}), rows counted as sequences"
            ]
        ordered = sorted(self.lengths)
        median = ordered[len(ordered) // 2] if ordered else 0
        line = f"data: {self.rows} rows, {len(self.lengths)} trained"
        if ordered:
            line += f", {ordered[0]}-{ordered[-1]} tokens (median {median})"
        if self.packing and self.lengths:
            fill = sum(self.lengths) / (self.sequences * self.max_seq_length)
            line += (
                f"; packed into {self.sequences} sequences of {self.max_seq_length} tokens ({fill:.0%} full)"
            )
        return [line, *self.report]


def _file_digest(names: list[str]) -> str:
    digest = hashlib.sha256()
    for path in expand_files(names):
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _tokenizer_stamp(model_name: str) -> list:
    """Identifies a local tokenizer's files cheaply (a hub name is keyed by its name alone)."""
    from finetune.tiny_model import tokenizer_digest

    local = Path(model_name)
    files = [local / "tokenizer.json", local / "tokenizer_config.json", local / "chat_template.jinja"]
    stamps = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    return [tokenizer_digest(), stamps]


def plan_data(
    conversations: list[Conversation],
    model_name: str,
    data: DataSection,
    max_seq_length: int,
    files: list[str],
    on_gpu: bool = True,
) -> DataPlan:
    """Token lengths and row counts of the training data, cached on the inputs' content (loading the
    128k-token tokenizer alone takes a second; a cached plan takes milliseconds)."""
    from finetune.tiny_model import cache_root

    key = json.dumps(
        [
            _PREPARE_VERSION,
            model_name,
            _tokenizer_stamp(model_name),
            resolve_chat_template(data.chat_template) if data.chat_template else None,
            data.model_dump(mode="json"),
            max_seq_length,
            _file_digest(files),
            # Which rows, in which order: held-out eval rows and mixing weights change them.
            hashlib.sha256("\n".join(c.source for c in conversations).encode()).hexdigest(),
        ],
        sort_keys=True,
    )
    # Unsloth turns packing off on the CPU (without FlashAttention, packed rows would attend to
    # each other), so a CPU run trains the rows unpacked.
    packing = data.packing and on_gpu
    notes = ["packing is off on the CPU: Unsloth needs FlashAttention to keep packed rows apart"] * (
        data.packing and not on_gpu
    )
    cache_file = cache_root() / "data-plans" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        return DataPlan(**{**cached, "packing": packing, "report": cached["report"] + notes})
    tokenizer = find_tokenizer(model_name, data.chat_template)
    if tokenizer is None:
        return DataPlan(
            rows=len(conversations),
            lengths=None,
            report=notes,
            tokenizer=f"no tokenizer for {model_name} on disk",
            packing=packing,
            max_seq_length=max_seq_length,
        )
    prepared = prepare(conversations, tokenizer, data, max_seq_length)
    plan = DataPlan(
        rows=len(conversations),
        lengths=prepared.lengths,
        report=prepared.report(max_seq_length),
        tokenizer=tokenizer.origin,
        packing=packing,
        max_seq_length=max_seq_length,
    )
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(plan)))
    tmp.replace(cache_file)
    return replace(plan, report=plan.report + notes)

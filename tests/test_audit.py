"""The data audit: numbers about what will be trained, and the `data` verb that prints them."""

from pathlib import Path

from cli_helpers import run_cli
from data_helpers import find_tokenizer, load_conversations, prepare

from finetune.data.audit import audit, percentile, trained_runs
from finetune.data.rows import Conversation
from finetune.recipe.schema import DataSection

ROOT = Path(__file__).resolve().parent.parent
CHAT = load_conversations([str(ROOT / "data_samples" / "code_chat.jsonl")])


def test_nearest_rank_percentiles():
    values = list(range(1, 101))
    assert [percentile(values, p) for p in (0, 50, 90, 100)] == [1, 50, 90, 100]
    assert percentile([], 50) == 0


def test_audit_of_the_sample_data():
    tokenizer = find_tokenizer("tiny-llama-3")
    prepared = prepare(CHAT, tokenizer, DataSection(train=["x"]), 1024)
    result = audit(prepared.examples, len(CHAT), prepared.report(1024), tokenizer.eos_id)
    lengths = sorted(len(e.input_ids) for e in prepared.examples)
    assert result.rows == result.kept == 40 and result.length_percentiles[100] == lengths[-1]
    assert result.trained_tokens == sum(e.trained_tokens for e in prepared.examples)
    assert result.missing_eos == [] and result.duplicates == [] and result.report == []
    runs = trained_runs(prepared.examples[0])
    assert [trained for _, trained in runs] == [False, True]  # prompt, then the one answer
    assert sum(len(ids) for ids, _ in runs) == len(prepared.examples[0].input_ids)


def test_duplicates_and_rows_that_never_learn_to_stop():
    tokenizer = find_tokenizer("tiny-llama-3")
    same = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo " * 60}]
    rows = [Conversation("f:1", same), Conversation("f:2", same), CHAT[0]]
    prepared = prepare(rows, tokenizer, DataSection(train=["x"], overlong="truncate"), 64)
    result = audit(prepared.examples, 3, prepared.report(64), tokenizer.eos_id)
    assert result.duplicates == [["f:1", "f:2"]]
    assert result.missing_eos[:2] == ["f:1", "f:2"]  # truncated before the <|eot_id|>
    assert any("duplicate rows in 1 groups (f:1 = f:2)" in line for line in result.lines())


def test_data_verb_prints_the_audit_and_marks_trained_tokens(tmp_path):
    png = tmp_path / "lengths.png"
    out = run_cli("data", "recipes/smoke.yaml", "--show", "1", "--png", str(png))
    assert out.returncode == 0, out.stderr
    assert "rows: 40 read, 40 kept" in out.stdout and "tokens per row: p50" in out.stdout
    answer = CHAT[0].messages[-1]["content"].strip()
    assert f"<|end_header_id|>\n\n[[{answer}<|eot_id|>]]" in out.stdout  # only the answer is marked
    assert png.read_bytes()[:4] == b"\x89PNG" and "heavy imports: []" in out.stdout


def test_data_verb_refuses_rows_that_would_train_nothing(tmp_path):
    out = run_cli(
        "data",
        "recipes/smoke.yaml",
        "model.max_seq_length=52",
        "data.overlong=truncate",
        "--png",
        str(tmp_path / "h.png"),
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "26 rows would train no token after truncation" in out.stderr

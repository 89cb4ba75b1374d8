"""Preference tuning before anything loads: the recipe's method and its options, preference rows
read, tokenized through the chat template and audited, and the plan's count of what a pair costs
(no torch: the fast tier). The training itself is in tests/e2e/test_preference_run.py."""

import importlib.util
import json
from pathlib import Path

import pytest
from cli_helpers import run_cli
from data_helpers import find_tokenizer

from finetune.base.errors import UserError
from finetune.data.preference import Pair, TokenizedPair, pair_length_policy, read_pair, tokenize_pair
from finetune.data.rows import iter_conversations
from finetune.data.store import row_reader
from finetune.models.base import planning_config
from finetune.models.shapes import Shapes
from finetune.plan.budget import Workload, plan_budget
from finetune.plan.devices import GPUS
from finetune.recipe.schema import METHOD_OPTIONS, load_recipe

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "benchmarks" / "docs_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)
SAMPLES = ROOT / "data_samples"
SMOKE = ROOT / "recipes" / "smoke.yaml"
PAIRS = ["train.method=dpo", f"data.train={SAMPLES / 'code_preference.jsonl'}"]
CHAT = [{"role": "user", "content": "Add two numbers."}]
GOOD, BAD = [{"role": "assistant", "content": "a + b"}], [{"role": "assistant", "content": "a - b"}]


def recipe_error(*overrides: str) -> str:
    with pytest.raises(UserError) as caught:
        load_recipe(SMOKE, list(overrides))
    return str(caught.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.beta=0.2"],
            "beta is an option of dpo, kto, orpo, simpo, grpo, not of method sft; remove it",
        ),
        (
            ["train.method=orpo", "train.loss_type=ipo"],
            "loss_type is an option of dpo, kto, grpo, not of method orpo",
        ),
        (["train.method=dpo", "train.simpo_gamma=1"], "simpo_gamma is an option of simpo, not of method dpo"),
        (["train.method=dpo", "train.loss_type=sigmod"], "did you mean 'sigmoid'?"),
        (["train.method=kto", "train.loss_type=apo_zero"], "did you mean 'apo_zero_unpaired'?"),
        (["train.method=dpo", "train.label_smoothing=0.5"], "label_smoothing: Input should be less than 0.5"),
        (
            ["train.method=dpoo"],
            "train.method: Input should be 'sft', 'dpo', 'kto', 'orpo', 'simpo' or 'grpo'",
        ),
        (["train.bta=0.1"], "unknown key 'train.bta'; did you mean 'beta'?"),
        (
            ["train.method=dpo", "data.format=messages"],
            "data.format messages is not read by train.method dpo",
        ),
        (["data.format=preference"], "data.format preference is not read by train.method sft"),
        (["train.method=kto", "data.format=preference"], "use unpaired or auto"),
        (["train.method=dpo", "data.packing=true"], "data.packing does not apply to train.method dpo"),
        (
            ["train.method=kto", "train.per_device_train_batch_size=1"],
            "method kto needs per_device_train_batch_size 2",
        ),
    ],
)
def test_each_wrong_method_setting_is_one_sentence(overrides, message):
    assert message in recipe_error(*overrides)


def test_the_method_options_reach_the_trainer_as_given_or_defaulted():
    recipe = load_recipe(SMOKE, ["train.method=simpo", "train.beta=2.5"])
    assert recipe.train.method_options() == {**METHOD_OPTIONS["simpo"], "beta": 2.5}
    assert METHOD_OPTIONS["simpo"]["cpo_alpha"] == 0.0  # SimPO as published: no NLL term
    # Unset stays unset: an SFT recipe's resolved form (and digest) is what it was.
    assert "method" not in load_recipe(SMOKE).model_dump(exclude_none=True)["train"]


def bad_row(row: dict, paired: bool = True) -> str:
    with pytest.raises(UserError) as caught:
        read_pair(row, "pairs.jsonl:7", paired)
    return str(caught.value)


@pytest.mark.parametrize(
    "row, paired, message",
    [
        (
            {"prompt": "q", "chosen": "a"},
            True,
            "pairs.jsonl:7: expected 'prompt', 'chosen' and 'rejected' (a preference pair) but the row "
            "has no 'rejected'",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": ""},
            True,
            "pairs.jsonl:7: 'rejected' is empty, so the pair compares nothing",
        ),
        (
            {"prompt": CHAT, "chosen": GOOD, "rejected": []},
            True,
            "pairs.jsonl:7: 'rejected' must be a non-empty string or list of messages",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "a"},
            True,
            "pairs.jsonl:7: 'chosen' and 'rejected' are the same answer, so the pair prefers nothing",
        ),
        (
            {"chosen": CHAT + GOOD, "rejected": CHAT + GOOD},
            True,
            "'chosen' and 'rejected' are the same answer",
        ),
        (
            {"chosen": CHAT + GOOD, "rejected": [{"role": "user", "content": "Subtract."}, *BAD]},
            True,
            "pairs.jsonl:7: 'chosen' and 'rejected' do not share a prompt: they differ at messages[0], "
            "before the answer",
        ),
        (
            {"prompt": CHAT, "chosen": CHAT + GOOD, "rejected": BAD},
            True,
            "pairs.jsonl:7: chosen[0] is a user turn; an answer is assistant turns only",
        ),
        (
            {"prompt": CHAT + GOOD, "chosen": GOOD, "rejected": BAD},
            True,
            "'prompt' ends with an assistant turn",
        ),
        (
            {"prompt": "q", "completion": "a", "label": 1},
            False,
            "pairs.jsonl:7: 'label' must be true (a desirable completion) or false (undesirable), not 1",
        ),
        ({"prompt": "q", "completion": "a", "label": "true"}, False, "not 'true'"),
        ({"prompt": "q", "completion": "a"}, False, "(an unpaired KTO row) but the row has no 'label'"),
        ({"prompt": "q", "completion": "", "label": True}, False, "'completion' is empty"),
    ],
)
def test_each_malformed_preference_row_is_one_sentence_with_its_place(row, paired, message):
    assert message in bad_row(row, paired)


def test_a_malformed_row_stops_validate_with_its_file_and_line_and_no_traceback(tmp_path):
    rows = [json.loads(line) for line in (SAMPLES / "code_preference.jsonl").read_text().splitlines()]
    rows[4]["rejected"] = rows[4]["chosen"]
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = run_cli("validate", str(SMOKE), "train.method=dpo", f"data.train={bad}")
    assert out.returncode == 2
    assert f"{bad}:5: 'chosen' and 'rejected' are the same answer, so the pair prefers nothing" in out.stderr
    assert "Traceback" not in out.stderr
    skipped = run_cli("validate", str(SMOKE), "train.method=dpo", f"data.train={bad}", "data.bad_rows=skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "1 bad rows skipped (data.bad_rows: skip)" in skipped.stderr


def test_the_sample_files_read_as_pairs_and_unpaired_rows():
    pairs = list(
        iter_conversations(
            [str(SAMPLES / "code_preference.jsonl")], read=row_reader(load_recipe(SMOKE, PAIRS))
        )
    )
    assert len(pairs) == 24 and all(p.chat and p.rejected for p in pairs)
    assert all(p.prompt[-1]["role"] == "user" and p.chosen[0]["role"] == "assistant" for p in pairs)
    kto = load_recipe(SMOKE, ["train.method=kto", f"data.train={SAMPLES / 'code_unpaired.jsonl'}"])
    rows = list(iter_conversations([str(SAMPLES / "code_unpaired.jsonl")], read=row_reader(kto)))
    assert (
        len(rows) == 32 and {r.label for r in rows} == {True, False} and all(r.rejected is None for r in rows)
    )


def test_a_chat_pair_is_its_prompt_then_each_answer_as_the_template_renders_them():
    tokenizer = find_tokenizer("tiny-llama-3")
    pair = read_pair({"chosen": CHAT + GOOD, "rejected": CHAT + BAD}, "x:1", True)
    tokens = tokenize_pair(tokenizer, pair)
    decode = lambda ids: tokenizer.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert decode(tokens.prompt_ids) == tokenizer.render(CHAT, add_generation_prompt=True)
    assert decode(tokens.chosen_ids) == "a + b<|eot_id|>" and decode(tokens.rejected_ids) == "a - b<|eot_id|>"
    whole = tokenizer.render(CHAT + GOOD)
    assert decode(tokens.prompt_ids + tokens.chosen_ids) == whole


def test_a_text_pair_is_bos_and_prompt_then_each_answer_and_eos():
    tokenizer = find_tokenizer("tiny-llama-3")
    tokens = tokenize_pair(
        tokenizer, read_pair({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, "x:1", True)
    )
    decode = lambda ids: tokenizer.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert decode(tokens.prompt_ids) == "<|begin_of_text|>2+2="
    assert decode(tokens.chosen_ids) == "4<|eot_id|>" and decode(tokens.rejected_ids) == "5<|eot_id|>"


def test_truncation_keeps_the_prompts_end_and_cuts_the_answers_end_and_says_where():
    long = Pair("x:1", "p", "c", "r")
    pair = TokenizedPair("x:1", list(range(30)), list(range(100, 140)), list(range(200, 210)))
    kept, status, cut = pair_length_policy(pair, 50, "truncate")
    assert (status, cut) == ("truncated", "prompt+answer")
    assert kept.prompt_ids == list(range(5, 30))  # its last half of 50, the turn the answer follows
    assert kept.chosen_ids == list(range(100, 125)) and kept.rejected_ids == list(range(200, 210))
    short_prompt = TokenizedPair("x:1", list(range(10)), list(range(100, 160)), [1])
    assert pair_length_policy(short_prompt, 50, "truncate")[2] == "answer"
    assert pair_length_policy(short_prompt, 50, "drop")[1] == "too long"
    with pytest.raises(UserError, match="x:1: 70 tokens \\(the prompt and its longer answer\\)"):
        pair_length_policy(short_prompt, 50, "error")
    assert long.conversation() == (None, [("p", False), ("c", True)])


def test_the_audit_shows_both_answers_of_a_pair_and_counts_their_tokens(tmp_path):
    out = run_cli("data", "recipes/code-dpo.yaml", "--show", "1", "--png", str(tmp_path / "h.png"))
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("pairs: "))
    assert line.startswith("pairs: 22; trained tokens: chosen") and line.endswith("never trained")
    assert figures.block(ROOT / "docs" / "preference.md", "audit-code-dpo") == [line], "run `make docs`"
    assert "--- rejected answer ---" in out.stdout
    assert out.stdout.count("<|eot_id|>]]") == 2  # each answer's end of turn is trained
    assert "heavy imports: []" in out.stdout


def test_a_truncated_pair_is_counted_with_where_the_cut_fell(tmp_path):
    out = run_cli(
        "data",
        str(SMOKE),
        *PAIRS,
        "model.max_seq_length=64",
        "data.overlong=truncate",
        "--png",
        str(tmp_path / "h.png"),
    )
    assert out.returncode == 0, out.stderr
    line = next(
        line for line in out.stdout.splitlines() if "pairs truncated to max_seq_length 64 tokens" in line
    )
    assert "in the prompt (its start cut)" in line and "in the answers (their end cut)" in line


def test_a_dpo_pair_costs_two_sequences_and_a_reference_pass_and_orpo_its_logits():
    base = ["model.name=unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", "model.max_seq_length=2048"]
    sft = load_recipe(SMOKE, base)
    dpo = load_recipe(SMOKE, [*base, *PAIRS])
    orpo = load_recipe(SMOKE, [*base, "train.method=orpo", PAIRS[1]])
    shapes = Shapes.from_config(planning_config(sft))
    work = Workload([1000, 2000], 2, False, 10)
    budgets = {
        r.train.method_name(): plan_budget(r, shapes, GPUS["rtx-4090"], work) for r in (sft, dpo, orpo)
    }
    assert budgets["dpo"].memory.tokens_per_micro_batch == 2 * budgets["sft"].memory.tokens_per_micro_batch
    assert "reference passes (no gradient)" in budgets["dpo"].time.terms
    assert "reference passes (no gradient)" not in budgets["orpo"].time.terms
    assert budgets["dpo"].time.step_seconds > budgets["orpo"].time.step_seconds
    assert "reference adapter (a frozen fp32 copy)" in budgets["dpo"].memory.terms
    # Unsloth on a GPU scores ORPO's hidden states in chunks (its concatenated_forward rewrite);
    # TRL's own (the transformers backend) makes the T x V logits, their log-softmax and its gradient.
    fused = budgets["orpo"].memory.terms["lm_head and loss (fused, chunked)"]
    plain = load_recipe(SMOKE, [*base, "train.method=orpo", PAIRS[1], "model.backend=transformers"])
    logits = plan_budget(plain, shapes, GPUS["rtx-4090"], work).memory.terms[
        "logits and loss (T x V: ORPO, CPO)"
    ]
    assert logits > 4 * 2048 * 128_256 * 10 > 10 * fused
    out = run_cli("plan", str(ROOT / "recipes" / "code-dpo.yaml"))
    assert "counted: each pair is 2 sequences (chosen, rejected) and a reference pass" in out.stdout


def test_dpo_on_the_transformers_backend_without_a_gpu_is_refused_before_anything_loads():
    out = run_cli(str(SMOKE), *PAIRS, "model.backend=transformers", "output.dir=/nonexistent/never")
    assert out.returncode == 2
    assert "train.method dpo on the transformers backend needs a CUDA GPU" in out.stderr
    assert "heavy imports: []" in out.stdout

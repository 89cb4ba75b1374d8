"""Bad recipes: each gets one clear message naming what and where, never a traceback."""

import re
from pathlib import Path

import pytest
import yaml
from cli_helpers import runner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finetune.base.errors import UserError
from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
schema: 1
version: 1.0.0
description: test
model:
  name: tiny-llama-3
  max_seq_length: 512
lora:
  r: 8
data:
  train: data_samples/code_chat.jsonl
train:
  learning_rate: 1.0e-4
  max_steps: 20
"""

# (id, replace this, with this, expected message: "{path}" is the recipe file)
BAD = [
    ("typo-top", "lora:", "lorra:", "{path}:7: unknown key 'lorra'; did you mean 'lora'?"),
    (
        "typo-model",
        "  max_seq_length",
        "  max_seq_len",
        "{path}:6: unknown key 'model.max_seq_len'; did you mean",
    ),
    ("typo-lora", "  r: 8", "  rank: 8", "{path}:8: unknown key 'lora.rank'"),
    (
        "typo-data",
        "  train: data",
        "  trian: data",
        "{path}:10: unknown key 'data.trian'; did you mean 'train'?",
    ),
    (
        "typo-train",
        "learning_rate",
        "learnig_rate",
        "{path}:12: unknown key 'train.learnig_rate'; did you mean",
    ),
    ("no-schema", "schema: 1\n", "", "'schema' is required"),
    ("newer-schema", "schema: 1", "schema: 7", "recipe schema 7 is newer than this program understands"),
    ("schema-zero", "schema: 1", "schema: 0", "{path}:1: schema: Input should be 1"),
    ("no-version", "version: 1.0.0\n", "", "'version' is required"),
    ("bad-version", "version: 1.0.0", "version: one", "{path}:2: version: String should match pattern"),
    ("no-description", "description: test\n", "", "'description' is required"),
    ("no-model", "model:\n  name: tiny-llama-3\n  max_seq_length: 512\n", "", "'model' is required"),
    ("no-model-name", "  name: tiny-llama-3\n", "", "'model.name' is required"),
    ("no-data", "data:\n  train: data_samples/code_chat.jsonl\n", "", "'data' is required"),
    (
        "seq-zero",
        "max_seq_length: 512",
        "max_seq_length: 0",
        "{path}:6: model.max_seq_length: Input should be greater",
    ),
    (
        "seq-text",
        "max_seq_length: 512",
        "max_seq_length: long",
        "model.max_seq_length: Input should be a valid integer",
    ),
    (
        "4bit-text",
        "  max_seq_length: 512",
        "  load_in_4bit: maybe",
        "model.load_in_4bit: Input should be a valid boolean",
    ),
    ("dtype", "  max_seq_length: 512", "  dtype: fp8", "model.dtype: Input should be 'auto', 'bfloat16'"),
    ("backend", "  max_seq_length: 512", "  backend: vllm", "model.backend: Input should be 'unsloth'"),
    ("rank-neg", "r: 8", "r: -8", "{path}:8: lora.r: Input should be greater than 0"),
    ("dropout", "  r: 8", "  dropout: 1.5", "lora.dropout: Input should be less than 1"),
    (
        "targets-empty",
        "  r: 8",
        "  target_modules: []",
        "lora.target_modules: List should have at least 1 item",
    ),
    (
        "targets-unknown",
        "  r: 8",
        "  target_modules: [q_proj, gate]",
        "lora.target_modules: 'gate' is not a linear layer of a Llama decoder layer; did you mean "
        "'gate_proj'? the layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
    ),
    (
        "targets-foo",
        "  r: 8",
        "  target_modules: [foo]",
        "lora.target_modules: 'foo' is not a linear layer of a Llama decoder layer; the layers are q_proj",
    ),
    (
        "init-pissa",
        "  r: 8",
        "  init_lora_weights: pissa",
        "lora.init_lora_weights: 'pissa' is not supported: it rewrites the base weights into a residual, "
        "which Unsloth refuses on a 4-bit base",
    ),
    ("init-loftq", "  r: 8", "  init_lora_weights: loftq", "init_lora_weights: 'loftq' is not supported"),
    ("init-olora", "  r: 8", "  init_lora_weights: olora", "init_lora_weights: Input should be 'default'"),
    ("tracker", "  r: 8", "  r: 8\noutput:\n  report_to: comet", "output.report_to.0: Input should be"),
    (
        "train-empty",
        "train: data_samples/code_chat.jsonl",
        "train: []",
        "data.train: List should have at least 1",
    ),
    (
        "format",
        "  train: data_samples/code_chat.jsonl",
        "  train: x.jsonl\n  format: csv",
        "data.format: Input",
    ),
    (
        "lr-zero",
        "learning_rate: 1.0e-4",
        "learning_rate: 0",
        "{path}:12: train.learning_rate: Input should be greater",
    ),
    (
        "lr-huge",
        "learning_rate: 1.0e-4",
        "learning_rate: 3",
        "train.learning_rate: Input should be less than or equal",
    ),
    (
        "lr-text",
        "learning_rate: 1.0e-4",
        "learning_rate: fast",
        "train.learning_rate: Input should be a valid number",
    ),
    (
        "scheduler",
        "  max_steps: 20",
        "  lr_scheduler_type: cosin",
        "train.lr_scheduler_type: Input should be 'cosine'",
    ),
    (
        "both-warmups",
        "  max_steps: 20",
        "  warmup_steps: 2\n  warmup_ratio: 0.1",
        "set warmup_steps or warmup_ratio",
    ),
    (
        "warmup-long",
        "  max_steps: 20",
        "  max_steps: 20\n  warmup_steps: 30",
        "warmup_steps (30) must be shorter",
    ),
    (
        "ratio-one",
        "  max_steps: 20",
        "  warmup_ratio: 1.0",
        "train.warmup_ratio: Input should be less than 1",
    ),
    (
        "eval-steps-without-eval-data",
        "  max_steps: 20",
        "  max_steps: 20\n  eval_steps: 5",
        "train.eval_steps is set but neither data.eval nor data.eval_fraction gives eval data",
    ),
    (
        "early-stopping-without-evaluations",
        "  max_steps: 20",
        "  max_steps: 20\n  early_stopping_patience: 3",
        "early_stopping_patience needs evaluations: set eval_steps (and data.eval or data.eval_fraction)",
    ),
    (
        "best-checkpoint-without-evaluations",
        "  max_steps: 20",
        "  max_steps: 20\n  load_best_model_at_end: true",
        "load_best_model_at_end needs evaluations: set eval_steps",
    ),
    (
        "early-stopping-without-the-best",
        "  max_steps: 20",
        "  max_steps: 20\n  eval_steps: 5\n  early_stopping_patience: 2\n  load_best_model_at_end: false",
        "early_stopping_patience needs load_best_model_at_end",
    ),
    (
        "threshold-without-patience",
        "  max_steps: 20",
        "  max_steps: 20\n  eval_steps: 5\n  early_stopping_threshold: 0.01",
        "early_stopping_threshold is ignored without early_stopping_patience; remove it",
    ),
    (
        "a-metric-no-run-logs",
        "  max_steps: 20",
        "  max_steps: 20\n  eval_steps: 5\n  early_stopping_patience: 2\n  metric_for_best_model: eval_los",
        "{path}:16: train.metric_for_best_model: 'eval_los' is no metric a run logs; "
        "did you mean 'eval_loss'?",
    ),
    (
        "the-highest-loss-kept",
        "  max_steps: 20",
        "  max_steps: 20\n  eval_steps: 5\n  early_stopping_patience: 2\n  greater_is_better: true",
        "greater_is_better: true would keep the checkpoint with the highest eval_loss",
    ),
    (
        "saves-between-evaluations",
        "  max_steps: 20",
        "  max_steps: 20\n  eval_steps: 5\n  save_steps: 3\n  load_best_model_at_end: true",
        "save_steps (3) must equal eval_steps (5) when the best checkpoint is kept",
    ),
    (
        "best-and-last-need-two",
        "  max_steps: 20",
        "  max_steps: 20\n  eval_steps: 5\n  save_total_limit: 1\n  early_stopping_patience: 2",
        "save_total_limit must be at least 2 when the best checkpoint is kept (best and last)",
    ),
    (
        "metric-without-best",
        "  max_steps: 20",
        "  max_steps: 20\n  eval_steps: 5\n  metric_for_best_model: eval_loss",
        "metric_for_best_model is ignored without load_best_model_at_end or early stopping",
    ),
    (
        "keep-best-by-another-name",
        "  max_steps: 20",
        "  max_steps: 20\n  keep_best: true",
        "{path}:14: unknown key 'train.keep_best'; did you mean 'load_best_model_at_end'?",
    ),
    (
        "eval-steps-neither-whole-nor-share",
        "  max_steps: 20",
        "  max_steps: 20\n  eval_steps: 2.5",
        "train.eval_steps: a whole number of steps, or a share of training below 1 (e.g. 0.1)",
    ),
    (
        "two-eval-sources",
        "  train: data_samples/code_chat.jsonl",
        "  train: data_samples/code_chat.jsonl\n  eval: data_samples/code_alpaca.jsonl\n  eval_fraction: 0.1",
        "set eval (files) or eval_fraction, not both",
    ),
    (
        "unknown-column",
        "  train: data_samples/code_chat.jsonl",
        "  train: data_samples/code_chat.jsonl\n  columns: {answer: output}",
        "columns: 'answer' is not a field we read",
    ),
    (
        "min-lr-missing",
        "  max_steps: 20",
        "  lr_scheduler_type: cosine_with_min_lr",
        "cosine_with_min_lr needs exactly one of min_lr or min_lr_rate",
    ),
    (
        "min-lr-both",
        "  max_steps: 20",
        "  lr_scheduler_type: cosine_with_min_lr\n  min_lr: 1.0e-5\n  min_lr_rate: 0.1",
        "set min_lr or min_lr_rate, not both",
    ),
    (
        "min-lr-ignored",
        "  max_steps: 20",
        "  min_lr: 1.0e-5",
        "min_lr is ignored by lr_scheduler_type 'cosine'; use one of cosine_with_min_lr, polynomial",
    ),
    (
        "min-lr-above-peak",
        "  max_steps: 20",
        "  lr_scheduler_type: polynomial\n  min_lr: 1.0e-3",
        "min_lr (0.001) must be below learning_rate (0.0001)",
    ),
    (
        "step-needs-gamma",
        "  max_steps: 20",
        "  lr_scheduler_type: step\n  step_size: 5",
        "lr_scheduler_type 'step' needs gamma",
    ),
    (
        "wsd-needs-decay",
        "  max_steps: 20",
        "  lr_scheduler_type: warmup_stable_decay",
        "lr_scheduler_type 'warmup_stable_decay' needs decay_ratio",
    ),
    (
        "gamma-ignored",
        "  max_steps: 20",
        "  gamma: 0.5",
        "gamma is ignored by lr_scheduler_type 'cosine'; remove it",
    ),
    (
        "gamma-growth",
        "  max_steps: 20",
        "  lr_scheduler_type: exponential\n  gamma: 1.5",
        "train.gamma: Input should be less than 1",
    ),
    (
        "batch-zero",
        "  max_steps: 20",
        "  per_device_train_batch_size: 0",
        "per_device_train_batch_size: Input should",
    ),
    (
        "accum-zero",
        "  max_steps: 20",
        "  gradient_accumulation_steps: 0",
        "gradient_accumulation_steps: Input should",
    ),
    ("optimizer", "  max_steps: 20", "  optim: sgd", "train.optim: Input should be 'adamw_8bit'"),
    (
        "epochs-neg",
        "  max_steps: 20",
        "  num_train_epochs: -1",
        "train.num_train_epochs: Input should be greater",
    ),
    ("section-scalar", "lora:\n  r: 8\n", "lora: 8\n", "{path}:7: lora: Input should be a valid dictionary"),
    (
        "duplicate",
        "  max_steps: 20",
        "  max_steps: 20\n  max_steps: 30",
        "{path}:14: key 'max_steps' is repeated (first",
    ),
    ("python-tag", "description: test", "description: !!python/object:os.system x", "unsupported YAML tag"),
    ("syntax", "  r: 8", "  r: [8", "not valid YAML"),
    ("tab-indent", "  r: 8", "\tr: 8", "not valid YAML"),
    ("list-top", GOOD, "- a\n- b\n", "a recipe must be a YAML mapping"),
    ("empty", GOOD, "", "the recipe file is empty"),
    ("comments-only", GOOD, "# nothing here\n", "the recipe file is empty"),
    ("extends-missing", "schema: 1", "extends: nope.yaml\nschema: 1", "{path}:1: parent recipe"),
    (
        "extends-unknown",
        "schema: 1",
        "extends: cod-gen\nschema: 1",
        "no recipe named 'cod-gen'; did you mean 'code-gen'?",
    ),
    ("extends-self", "schema: 1", "extends: r.yaml\nschema: 1", "extends forms a cycle"),
]


@pytest.mark.parametrize("case", BAD, ids=[case[0] for case in BAD])
def test_bad_recipe_message(tmp_path, case):
    _, old, new, expected = case
    assert old in GOOD or old == GOOD
    path = tmp_path / "r.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert expected.format(path=path) in str(err.value)


def test_every_mistake_in_one_file_is_reported_together(tmp_path):
    """The loader collects every problem before it stops: a recipe with the mistakes of five of
    these cases at once (in different sections and fields) gets each case's message, with its line,
    in one error of five lines."""
    chosen = ("bad-version", "typo-lora", "typo-train", "optimizer", "epochs-neg")
    cases = [case for name in chosen for case in BAD if case[0] == name]
    text, added = GOOD, []
    for _, old, new, _ in cases:
        if old == "  max_steps: 20":  # these add a line at the end of the file instead
            added.append(new)
        else:
            text = text.replace(old, new, 1)
    path = tmp_path / "r.yaml"
    path.write_text(text + "".join(line + "\n" for line in added))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    for name, _, _, expected in cases:
        assert expected.format(path=path) in message, (name, message)
    assert len(message.splitlines()) == len(cases), message


def test_good_recipe_is_good(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD)
    assert load_recipe(tmp_path / "r.yaml").train.max_steps == 20


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"schema: 1\ndescription: caf\xe9\n", "r.yaml:2: not UTF-8 text (byte 0xe9)"),
        (None, "is a directory"),
    ],
)
def test_unreadable_files(tmp_path, content, expected):
    path = tmp_path / "r.yaml"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(expected)):
        load_recipe(path)


def test_extends_cycle_between_two_files(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match=r"extends forms a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_recipe(tmp_path / "a.yaml")


def test_extends_overrides_only_what_changes(tmp_path):
    (tmp_path / "base.yaml").write_text(GOOD)
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nlora:\n  alpha: 64\ntrain:\n  max_stepz: 3\n")
    with pytest.raises(UserError) as err:
        load_recipe(tmp_path / "child.yaml")
    # The typo is reported in the child, at its own line.
    assert (
        str(err.value)
        == f"{tmp_path / 'child.yaml'}:5: unknown key 'train.max_stepz'; did you mean 'max_steps'?"
    )
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nlora:\n  alpha: 64\n")
    recipe = load_recipe(tmp_path / "child.yaml")
    assert (recipe.lora.r, recipe.lora.alpha, recipe.train.max_steps) == (8, 64, 20)
    # A bad value inherited from the parent is reported at the parent's line.
    (tmp_path / "base.yaml").write_text(GOOD.replace("r: 8", "r: -1"))
    with pytest.raises(UserError, match=rf"^{tmp_path / 'base.yaml'}:8: lora.r"):
        load_recipe(tmp_path / "child.yaml")


def test_cli_reports_bad_input_with_exit_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe not text")
    out = runner("validate", str(bad), str(tmp_path), "recipes/smoke.yaml", hide_gpu=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"{bad}:1: not UTF-8 text" in out.stderr and "is a directory" in out.stderr
    assert "ok recipes/smoke.yaml" in out.stdout  # the good recipe is still checked


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)
_keys = st.sampled_from(
    [
        "schema",
        "version",
        "description",
        "model",
        "lora",
        "data",
        "train",
        "output",
        "extends",
        "parent",
        "name",
        "r",
        "learning_rate",
        "max_steps",
        "bogus",
    ]
)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.dictionaries(_keys, _values, max_size=6) | _values)
@example(document={"list[": None})  # once crashed the error report: keys shaped like pydantic's own steps
@example(document={"model": {"function-after[x]": 1}})
def test_fuzzed_documents_never_raise_anything_but_recipe_error(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_recipe(path)
    except UserError as exc:
        assert str(exc)


@settings(deadline=None)
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_fuzzed_overrides_never_raise_anything_but_recipe_error(overrides):
    try:
        load_recipe(ROOT / "recipes" / "smoke.yaml", overrides)
    except UserError as exc:
        assert str(exc)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_fuzzed_text_never_raises_anything_but_recipe_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except UserError as exc:
        assert str(exc)


@pytest.mark.parametrize("key", ["list[", "list[int]", "function-after[check(), Data]"])
def test_a_key_shaped_like_a_validator_step_is_named_as_unknown(tmp_path, key):
    recipe = yaml.safe_load((ROOT / "recipes" / "smoke.yaml").read_text())
    recipe["lora"][key] = 1
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    assert f"unknown key 'lora.{key}'" in str(caught.value)

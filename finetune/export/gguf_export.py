"""GGUF for llama.cpp, Ollama and LM Studio: the merged 16-bit model converted by llama.cpp's own
converter, quantized by llama.cpp's own quantizer, then read back and checked.

The tools come from a package registry when the project is set up, never from the internet at run
time (Unsloth's save_pretrained_gguf clones and compiles llama.cpp when first called):
- `make setup` unpacks llama.cpp's `convert_hf_to_gguf.py`, its `conversion` package and its `gguf-py`
  from the llama-cpp-python source distribution on PyPI (pinned with its hash in
  requirements-gguf.txt) into .venv/llama.cpp. f16 and q8_0 need nothing more.
- q4_k_m needs llama.cpp compiled: `make gguf-quantize` builds llama-cpp-python from the same source
  (about 25 minutes on two cores), whose `llama_model_quantize` is the function llama-quantize calls.

The converter writes the chat template and the tokenizer's end-of-sequence token; we add Llama 3's
other stops by id (`tokenizer.ggml.eot_token_id`, `eom_token_id`, and the `eos_token_ids` array
Ollama's engine reads), so a runtime that stops only on what the metadata says still stops.
Run as `python -m finetune.export.gguf_export convert|quantize ...`: each tool runs in its own process, whose
memory is returned when it ends and whose output goes to a log file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from finetune.base.errors import UserError
from finetune.base.processes import child_setup
from finetune.models.base import base_model, planning_config
from finetune.models.shapes import Shapes
from finetune.plan.disk import LLAMA3_TOKENIZER_BYTES, tokenizer_bytes
from finetune.recipe.schema import Recipe

QUANTS = ("f16", "q8_0", "q4_k_m")
DEFAULT_QUANT = "q8_0"  # close to lossless, and needs no compiled tool
# Llama 3's end-of-turn, end-of-message (after a tool call) and end-of-text tokens.
LLAMA3_STOPS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
SETUP_HINT = "`make setup` unpacks it from the llama-cpp-python source distribution (PyPI)"
QUANTIZE_HINT = (
    "`make gguf-quantize` compiles it once from the same source (about 25 minutes on two cores); "
    "f16 and q8_0 need nothing more"
)


def converter_dir() -> Path:
    """Where `make setup` unpacked llama.cpp's converter, or FINETUNE_LLAMA_CPP (the GPU machine's
    image is not our environment: benchmarks/gpu_first_command.sh unpacks the converter beside it)."""
    return Path(os.environ.get("FINETUNE_LLAMA_CPP") or Path(sys.prefix) / "llama.cpp")


def quantizer_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("llama_cpp") is not None


def quantization(fmt: str | None, quant: str | None) -> str | None:
    """The GGUF quantization `export --format/--quant` asks for; None for safetensors."""
    if fmt == "safetensors" and quant:
        raise UserError(f"export: --quant {quant} applies to GGUF; drop --format safetensors or --quant")
    if quant is None and fmt == "gguf":
        return DEFAULT_QUANT
    if quant is not None and quant not in QUANTS:
        raise UserError(f"export: unknown quantization '{quant}'; choose one of {', '.join(QUANTS)}")
    return quant


def check_tools(quant: str) -> None:
    """Refuse, before anything is merged, an export whose tool is not installed."""
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"export: llama.cpp's converter is not in {converter_dir()}; {SETUP_HINT}")
    if quant == "q4_k_m" and not quantizer_installed():
        raise UserError(f"export: q4_k_m needs llama.cpp's compiled quantizer; {QUANTIZE_HINT}")


# --- sizes, for the disk check -------------------------------------------------------------------


def _block_bytes(quant_type: str, elements: int, row: int) -> int:
    """Bytes of one tensor in a ggml type (`gguf.GGML_QUANT_SIZES`: weights per block, bytes per
    block); a row the block does not divide is stored in the converter's fallback, f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[quant_type]]
    if row % block:
        return 2 * elements
    return elements // block * size


def tensor_bytes(shapes: Shapes, quant: str) -> int:
    """Bytes of the model's tensors in a GGUF of this quantization. Matrices take the quantization,
    vectors (norms) stay F32, as llama.cpp writes them. For q4_k_m this is an upper bound: llama.cpp
    mixes Q4_K and Q6_K per tensor, counted here as Q6_K throughout (Q8_0 where 256 does not divide a
    row, as llama.cpp falls back)."""
    matrices = [(i, i * o) for i, o in shapes.projections().values()] * shapes.layers
    matrices += [(shapes.hidden, shapes.vocab * shapes.hidden)] * (1 if shapes.tied else 2)
    vectors = shapes.norm_parameters + shapes.head_dim // 2  # the norms, and llama 3's rope_freqs
    kind = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q6_K"}[quant]

    def one(row: int, elements: int) -> int:
        if kind == "Q6_K" and row % 256:
            return _block_bytes("Q8_0", elements, row)
        return _block_bytes(kind, elements, row)

    return sum(one(row, n) for row, n in matrices) + 4 * vectors


def gguf_bytes(shapes: Shapes, quant: str, tokenizer: int) -> int:
    """The GGUF file: its tensors, and the vocabulary and merges in its metadata (smaller than the
    tokenizer's JSON files, which bound it)."""
    return tensor_bytes(shapes, quant) + tokenizer


def disk_needed(shapes: Shapes, quant: str, tokenizer: int, merged: float) -> float:
    """The most the export holds on disk at once: the merged 16-bit model and the GGUF converted
    from it; for q4_k_m the f16 GGUF and the quantized one (the merge is removed before quantizing)."""
    converted = gguf_bytes(shapes, "f16" if quant == "q4_k_m" else quant, tokenizer)
    after = converted + gguf_bytes(shapes, quant, tokenizer) if quant == "q4_k_m" else 0
    return max(merged + converted, after)


def peak_bytes(recipe: Recipe, quant: str, merged: float) -> float:
    """The most a GGUF export of ``recipe``'s run holds in its folder at once (disk_needed), given the
    merged model's bytes; without the trained model's shape on disk, the merged model alone."""
    folder, config = base_model(recipe)["path"], planning_config(recipe)
    if config is None:
        return merged
    tokenizer = tokenizer_bytes(Path(folder) if folder else None) or LLAMA3_TOKENIZER_BYTES
    return disk_needed(Shapes.from_config(config), quant, tokenizer, merged)


# --- the stops and the Modelfile -----------------------------------------------------------------


@dataclass(frozen=True)
class Stops:
    eos: int  # the tokenizer's end of sequence, which the converter writes
    eot: int | None
    eom: int | None
    all_ids: tuple[int, ...]  # every stop the model may emit (generation_config's eos_token_id list)
    texts: tuple[str, ...]  # their tokens' text, for Ollama's PARAMETER stop


def stops_of(model_dir: Path) -> Stops:
    """The stop tokens of a merged model folder, from its tokenizer and generation_config.json."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    eos_text = config["eos_token"] if isinstance(config["eos_token"], str) else config["eos_token"]["content"]
    found = [ids[text] for text in LLAMA3_STOPS if text in ids]
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        listed = json.loads(generation.read_text()).get("eos_token_id") or []
        found += listed if isinstance(listed, list) else [listed]
    all_ids = tuple(sorted({ids[eos_text], *found}))
    names = {i: text for text, i in ids.items()}
    texts = tuple(names[i] for i in all_ids)
    return Stops(ids[eos_text], ids.get("<|eot_id|>"), ids.get("<|eom_id|>"), all_ids, texts)


# Llama 3.1 Instruct's chat template (finetune/data/templates/) for a conversation of system, user and
# assistant messages, written for Ollama's engine (Go's text/template over its .Messages). The
# Jinja original puts the first message, when it is a system one, inside the system header that it
# always opens with Meta's two date lines; so does this. The <|begin_of_text|> the Jinja starts with
# is not here: the GGUF says add_bos_token, and the runtime's tokenizer adds it.
_LLAMA31_OLLAMA = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    '{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq $m.Role "system") }}{{ $m.Content }}'
    "{{ end }}{{ end }}<|eot_id|>"
    '{{ range $i, $m := .Messages }}{{ if or (ne $i 0) (ne $m.Role "system") }}'
    "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>{{ end }}{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# Which shipped Jinja templates have an Ollama equivalent, and how exact it is.
_OLLAMA_TEMPLATES = {
    "llama-3.1-instruct-exact": (_LLAMA31_OLLAMA, "renders every conversation as the chat template does"),
    "llama-3.1-instruct": (
        _LLAMA31_OLLAMA,
        "renders as the chat template does when no message begins or ends with whitespace (Meta's "
        "template trims each message; Go's templates cannot)",
    ),
}
# Conversations a template is recognised by: with and without a system message, several turns, a
# system message late, and contents with surrounding whitespace (which tell the two apart).
PROBES = [
    [{"role": "user", "content": "Write fizzbuzz."}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": "def f(x):\n    return x"},
        {"role": "user", "content": "Now in one line."},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": "late"},
        {"role": "user", "content": "again"},
    ],
    [
        {"role": "user", "content": "  indented\n"},
        {"role": "assistant", "content": "    return x\n\n"},
        {"role": "user", "content": "\nmore "},
    ],
    [{"role": "system", "content": " spaced system \n"}, {"role": "user", "content": "x"}],
]


def _renderings(chat_template: str) -> list[str] | None:
    """The probes rendered as training renders them (transformers' Jinja environment), or None for a
    template that cannot render them."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            PROBES, chat_template=chat_template, add_generation_prompt=True, bos_token="<|begin_of_text|>"
        )
    except Exception:  # noqa: BLE001 - any template error means: not one we know
        return None
    return rendered


def ollama_template(chat_template: str | None) -> tuple[str, str] | None:
    """(the Go template, how it relates to the run's Jinja one) when the run's template renders every
    probe conversation as one of ours does (a copy that differs only in comments or spacing is
    still recognised), or None (then the Modelfile leaves TEMPLATE out and says why)."""
    if chat_template is None:
        return None
    folder = files("finetune.data") / "templates"
    rendered = _renderings(chat_template)
    for name, translation in _OLLAMA_TEMPLATES.items():
        ours = (folder / f"{name}.jinja").read_text()
        if chat_template == ours or (rendered is not None and rendered == _renderings(ours)):
            return translation
    return None


def modelfile(gguf_name: str, chat_template: str | None, stops: Stops) -> tuple[str, str]:
    """The Ollama Modelfile beside the GGUF, and one line saying what its template is."""
    lines = [f"# ollama create NAME -f Modelfile  (in this folder)\nFROM ./{gguf_name}"]
    translated = ollama_template(chat_template)
    if translated is None:
        note = (
            "the run's chat template is not one we translate for Ollama: the Modelfile has no TEMPLATE "
            "(the GGUF carries the Jinja template, which llama.cpp's server uses with --jinja)"
        )
        lines.append(f"# {note}")
    else:
        template, how = translated
        note = f"the Modelfile's TEMPLATE {how}"
        lines.append(f'# The TEMPLATE {how}.\nTEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{text}"' for text in stops.texts]
    return "\n".join(lines) + "\n", note


# --- running llama.cpp's tools -------------------------------------------------------------------


def run_tool(args: list[str], log: Path, what: str) -> None:
    """`python -m finetune.export.gguf_export ARGS` with its output in ``log``; a failure is one sentence
    quoting the tool's last line."""
    with log.open("a") as out:
        done = subprocess.run(
            [sys.executable, "-m", "finetune.export.gguf_export", *args],
            stdout=out,
            stderr=out,
            preexec_fn=child_setup(),  # a converter writing gigabytes must not outlive the export
        )
    if done.returncode:
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise UserError(
            f"export: {what} failed (exit {done.returncode}): {last[0] if last else 'no output'}; "
            f"the whole output is in {log}"
        )


def _convert(model_dir: Path, out_file: Path, quant: str) -> None:
    """llama.cpp's converter, as its own main() drives it, plus the stop tokens' ids."""
    import logging

    logging.basicConfig(level=logging.INFO)  # what llama.cpp's own main() logs, into the log file
    sys.path[:0] = [str(converter_dir()), str(converter_dir() / "gguf-py")]  # its own gguf-py first
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    if os.environ.get("FINETUNE_INJECT_FAULT") == "gguf-convert":  # the tests' failing converter
        raise SystemExit("injected converter failure")
    hparams = ModelBase.load_hparams(model_dir, False)
    model_class = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    model = model_class(model_dir, ftype, out_file)
    stops = stops_of(model_dir)
    set_vocab = model.set_vocab

    def set_vocab_and_stops() -> None:
        set_vocab()
        writer = model.gguf_writer
        if stops.eot is not None:
            writer.add_eot_token_id(stops.eot)
        if stops.eom is not None:
            writer.add_eom_token_id(stops.eom)
        writer.add_array(EOS_IDS_KEY, list(stops.all_ids))

    model.set_vocab = set_vocab_and_stops
    with torch.inference_mode():
        model.write()


def _quantize(source: Path, out_file: Path) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(), ctypes.byref(params)):
        raise SystemExit(f"llama_model_quantize could not quantize {source}")


EOS_IDS_KEY = "tokenizer.ggml.eos_token_ids"  # Ollama's engine stops on each id listed here


# --- reading it back -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What the GGUF must carry, read from the merged model folder before it is removed."""

    vocab: int
    chat_template: str | None
    stops: Stops


def expected_of(model_dir: Path) -> Expected:
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    added = {t["content"] for t in tokenizer["added_tokens"]} - set(vocab)
    template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    return Expected(len(vocab) + len(added), template, stops_of(model_dir))


def check_gguf(path: Path, expected: Expected) -> str:
    """Read the GGUF back (the `gguf` package's reader) and compare what a runtime relies on with the
    merged model it came from: the vocabulary, the chat template, the stops. Raises on a mismatch."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str):
        return fields[key].contents() if key in fields else None

    stops, wrong = expected.stops, []
    tokens = len(value("tokenizer.ggml.tokens") or [])
    if tokens != expected.vocab:
        wrong.append(f"{tokens} tokens, the tokenizer has {expected.vocab}")
    if value("tokenizer.chat_template") != expected.chat_template:
        wrong.append("its chat template differs from the run's")
    ids = {"eos_token_id": stops.eos, "eot_token_id": stops.eot, "eom_token_id": stops.eom}
    for key, want in ids.items():
        if want is not None and value(f"tokenizer.ggml.{key}") != want:
            wrong.append(f"tokenizer.ggml.{key} is {value(f'tokenizer.ggml.{key}')}, not {want}")
    if tuple(value(EOS_IDS_KEY) or ()) != stops.all_ids:
        wrong.append(f"{EOS_IDS_KEY} is {value(EOS_IDS_KEY)}, not {list(stops.all_ids)}")
    if wrong:
        raise UserError(f"export: the GGUF {path} does not match the merged model: {'; '.join(wrong)}")
    return (
        f"read back: {tokens:,} tokens (pre-tokenizer {value('tokenizer.ggml.pre')}), the run's chat "
        f"template, stops {', '.join(stops.texts)} (ids {', '.join(map(str, stops.all_ids))})"
    )


# --- the export ----------------------------------------------------------------------------------


def write_gguf(merged: Path, out_dir: Path, quant: str, name: str, log: Path) -> tuple[Path, list[str]]:
    """Convert (and for q4_k_m quantize) a merged 16-bit model folder into OUT_DIR/NAME-QUANT.gguf,
    check it and write a Modelfile beside it; the lines to print. The merged folder is an
    intermediate: removed once converted, and on failure, with any partial file."""
    final = out_dir / f"{name}-{quant}.gguf"
    partial = final.with_name(final.name + ".partial")
    f16 = out_dir / f"{name}-f16.gguf.partial"
    expected = expected_of(merged)
    try:
        if quant == "q4_k_m":
            run_tool(["convert", str(merged), str(f16), "f16"], log, "llama.cpp's converter")
            check_gguf(f16, expected)
            shutil.rmtree(merged)  # before quantizing: the disk check counted on its room
            run_tool(["quantize", str(f16), str(partial)], log, "llama.cpp's quantizer")
        else:
            run_tool(["convert", str(merged), str(partial), quant], log, "llama.cpp's converter")
        read_back = check_gguf(partial, expected)
        partial.rename(final)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
        for leftover in (partial, f16):
            leftover.unlink(missing_ok=True)
    text, note = modelfile(final.name, expected.chat_template, expected.stops)
    (out_dir / "Modelfile").write_text(text)
    return final, [read_back, note]


def main(argv: list[str]) -> None:
    verb, *paths = argv
    if verb == "convert":
        _convert(Path(paths[0]), Path(paths[1]), paths[2])
    elif verb == "quantize":
        _quantize(Path(paths[0]), Path(paths[1]))
    else:
        raise SystemExit(f"unknown verb {verb}")


if __name__ == "__main__":
    main(sys.argv[1:])

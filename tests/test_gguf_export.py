"""`export --quant`'s refusals, each one sentence before anything heavy. The GGUF itself is made and
checked, and the Modelfile's template recognised and rendered, in tests/e2e/test_gguf.py."""

import re
import sys
from pathlib import Path

import pytest
from cli_helpers import finished_run_shape, run_cli

from finetune.base.errors import UserError
from finetune.cli import commands
from finetune.export import gguf_export

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_dir(tmp_path):
    """What a finished run holds, as far as the checks look."""
    return finished_run_shape(tmp_path / "runs" / "smoke" / "20261204-000000-abcdef")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quant", "q5_k"], "export: unknown quantization 'q5_k'; choose one of f16, q8_0, q4_k_m"),
        (
            ["--format", "safetensors", "--quant", "q8_0"],
            "export: --quant q8_0 applies to GGUF; drop --format safetensors or --quant",
        ),
    ],
)
def test_a_wrong_quantization_is_one_sentence_before_anything_heavy(run_dir, flags, message):
    out = run_cli("export", str(run_dir), *flags)
    assert out.returncode == 2 and out.stderr.strip() == f"error: {message}"
    assert "heavy imports: []" in out.stdout and not (run_dir / "gguf").exists()


def test_a_run_without_an_adapter_is_refused(run_dir):
    (run_dir / "adapter" / "adapter_config.json").unlink()
    out = run_cli("export", str(run_dir), "--format", "gguf")
    assert out.returncode == 2 and "no adapter yet" in out.stderr and "Traceback" not in out.stderr
    assert "heavy imports: []" in out.stdout and not (run_dir / "gguf").exists()


def test_q4_k_m_without_the_compiled_quantizer_says_how_to_build_it(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(gguf_export, "quantizer_installed", lambda: False)
    assert commands.main(["export", str(run_dir), "--quant", "q4_k_m"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "export: q4_k_m needs llama.cpp's compiled quantizer; `make gguf-quantize` compiles it" in said
    assert "f16 and q8_0 need nothing more" in said and not (run_dir / "gguf").exists()


def test_a_missing_converter_names_the_setup_step(run_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gguf_export, "converter_dir", lambda: tmp_path / "no-llama.cpp")
    assert commands.main(["export", str(run_dir), "--quant", "q8_0"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"llama.cpp's converter is not in {tmp_path / 'no-llama.cpp'}; `make setup` unpacks it" in said


def test_the_converter_is_looked_for_where_make_setup_unpacks_it(monkeypatch, tmp_path):
    """`make setup` unpacks it into the virtual environment ($(VENV)/llama.cpp, the interpreter's
    sys.prefix); FINETUNE_LLAMA_CPP (the GPU machine's image) takes precedence. The export's check
    passes with the converter there and names that folder without it."""
    assert "CONVERTER := $(VENV)/llama.cpp/" in (ROOT / "Makefile").read_text()
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.delenv("FINETUNE_LLAMA_CPP", raising=False)
    with pytest.raises(UserError, match=f"converter is not in {re.escape(str(venv / 'llama.cpp'))};"):
        gguf_export.check_tools("q8_0")
    (venv / "llama.cpp").mkdir(parents=True)
    (venv / "llama.cpp" / "convert_hf_to_gguf.py").write_text("")
    gguf_export.check_tools("q8_0")  # found: nothing to refuse
    monkeypatch.setenv("FINETUNE_LLAMA_CPP", str(elsewhere))
    with pytest.raises(UserError, match=f"converter is not in {re.escape(str(elsewhere))};"):
        gguf_export.check_tools("q8_0")
    elsewhere.mkdir()
    (elsewhere / "convert_hf_to_gguf.py").write_text("")
    gguf_export.check_tools("f16")

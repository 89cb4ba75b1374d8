"""`export --quant`'s refusals, each one sentence before anything heavy. The GGUF itself is made and
checked, and the Modelfile's template recognised and rendered, in tests/e2e/test_gguf.py."""

from pathlib import Path

import pytest
from cli_helpers import run_cli

from finetune import cli, gguf_export

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_dir(tmp_path):
    """What a finished run holds, as far as the checks look."""
    run_dir = tmp_path / "runs" / "smoke" / "20261204-000000-abcdef"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "manifest.json").write_text("{}")
    (run_dir / "recipe.yaml").write_text((ROOT / "recipes" / "smoke.yaml").read_text())
    return run_dir


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
    assert cli.main(["export", str(run_dir), "--quant", "q4_k_m"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "export: q4_k_m needs llama.cpp's compiled quantizer; `make gguf-quantize` compiles it" in said
    assert "f16 and q8_0 need nothing more" in said and not (run_dir / "gguf").exists()


def test_a_missing_converter_names_the_setup_step(run_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gguf_export, "converter_dir", lambda: tmp_path / "no-llama.cpp")
    assert cli.main(["export", str(run_dir), "--quant", "q8_0"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"llama.cpp's converter is not in {tmp_path / 'no-llama.cpp'}; `make setup` unpacks it" in said


def test_make_setup_unpacked_the_converter():
    assert (gguf_export.converter_dir() / "convert_hf_to_gguf.py").is_file()
    assert (gguf_export.converter_dir() / "gguf-py" / "gguf" / "gguf_writer.py").is_file()

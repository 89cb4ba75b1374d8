# `make demo` and `make test` are the two commands; each sets up .venv first when needed.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The install is keyed on the requirement files' content: a second call installs nothing,
# an edited pin reinstalls.
REQ_HASH := $(shell cat requirements.txt requirements-unsloth.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)

# No model hub is reachable in CI; never wait on one.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

# llama.cpp's GGUF converter (see requirements-gguf.txt): unpacked once from the registry's source
# distribution, never fetched at run time.
GGUF_HASH := $(shell sha256sum requirements-gguf.txt | cut -c1-16)
CONVERTER := $(VENV)/llama.cpp/.from-$(GGUF_HASH)
SDIST := $(VENV)/llama.cpp-sdist
LLAMA_CPP_FILES := convert_hf_to_gguf.py conversion gguf-py LICENSE

.PHONY: setup demo test test-fast fuzz smoke chaos canary lint clean gguf-quantize rehearse-gpu docs

setup: $(STAMP) $(CONVERTER)

$(STAMP):
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
		echo "$(VENV) is not Python 3.11: recreating it"; rm -rf $(VENV); fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-unsloth.txt
	@# pip check must find nothing but the certifi pin explained in requirements-unsloth.txt and the
	@# xformers that requirements.txt explains leaving out.
	@problems=$$($(PY) -m pip check 2>/dev/null \
		| grep -vE '^unsloth(-zoo)? 2026\.10\.9 has requirement certifi>=2026\.10\.19' \
		| grep -vx 'unsloth 2026\.10\.9 requires xformers, which is not installed\.' \
		| grep -v '^No broken requirements'); \
	if [ -n "$$problems" ]; then echo "pip check: $$problems"; exit 1; fi
	@touch $@
	@echo "$(VENV) is ready"

$(CONVERTER): $(STAMP)
	@rm -rf $(VENV)/llama.cpp $(SDIST)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
		--require-hashes -r requirements-gguf.txt -d $(SDIST)
	@mkdir -p $(SDIST)/x $(VENV)/llama.cpp
	@tar -xzf $(SDIST)/llama_cpp_python-*.tar.gz -C $(SDIST)/x \
		$(foreach f,$(LLAMA_CPP_FILES),--wildcards '*/vendor/llama.cpp/$(f)')
	@for f in $(LLAMA_CPP_FILES); do mv $(SDIST)/x/*/vendor/llama.cpp/$$f $(VENV)/llama.cpp/; done
	@rm -rf $(SDIST)
	@touch $@
	@echo "llama.cpp's GGUF converter is in $(VENV)/llama.cpp"

# Optional: llama.cpp compiled (several minutes on two cores), for `export --quant q4_k_m`.
gguf-quantize: setup
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements-gguf.txt

demo: setup
	$(PY) runner.py recipes/smoke.yaml

# The fast tier on both cores (its slow-marked tests too), then the end-to-end tier in one process
# (its tests train, kill and time runs: one at a time).
test: setup
	$(PY) -m pytest -n 2 --dist worksteal --ignore=tests/e2e --durations=10
	$(PY) -m pytest tests/e2e --durations=30

# The fast tier: everything but tests/e2e and the few light tests marked slow (`make test` runs
# them), without torch or Unsloth, on both cores (under 2 minutes).
test-fast: setup
	$(PY) -m pytest -n 2 --dist worksteal --ignore=tests/e2e -m "not slow"

# `make test` replays a fixed set of generated inputs; this draws 20,000 fresh ones per property.
fuzz: setup
	HYPOTHESIS_PROFILE=explore $(PY) -m pytest -q -k fuzz tests/test_fuzz.py tests/test_recipe_errors.py tests/test_data.py

# Every shipped recipe on the tiny model, checked against finetune/cli/smoke_bands.json (GPU if present).
smoke: setup
	$(PY) runner.py smoke

# The smoke run killed with SIGKILL at seeded moments of every phase of its life, each recovered and
# held to the uninterrupted run's adapter (benchmarks/chaos.py): KILLS=20 SEED=7 by default.
KILLS ?= 20
SEED ?= 7
chaos: setup
	$(PY) benchmarks/chaos.py --kills $(KILLS) --seed $(SEED) --json benchmarks/results/chaos.json

# The same smoke against the newest releases of the training stack, in its own environment, so a
# breaking upstream release shows up as a failed band naming the versions that changed.
CANARY := .venv-canary
# unsloth and unsloth_zoo go in without their declared dependencies, as in `make setup` (see
# requirements-unsloth.txt): with them pip's resolver falls back to an older unsloth.
CANARY_PACKAGES := trl transformers peft datasets accelerate bitsandbytes
canary:
	@[ -x $(CANARY)/bin/python ] || $(PYTHON) -m venv $(CANARY)
	$(CANARY)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(CANARY)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade $(CANARY_PACKAGES)
	$(CANARY)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade --no-deps unsloth unsloth_zoo
	@# Both engines on the newest releases: when Unsloth's breaks, the verdict says whether plain
	@# transformers (model.backend: transformers) still trains, the fallback until Unsloth is fixed.
	@u=0; $(CANARY)/bin/python runner.py smoke --json canary-result.json --output runs/_canary || u=$$?; \
	t=0; $(CANARY)/bin/python runner.py recipes/smoke.yaml model.backend=transformers train.max_steps=12 \
		output.dir=runs/_canary/transformers || t=$$?; \
	echo "canary: unsloth backend $$([ $$u = 0 ] && echo fine || echo broken)," \
		"transformers backend $$([ $$t = 0 ] && echo fine || echo broken)"; \
	[ $$u = 0 ] && [ $$t = 0 ]

# The GPU machine's two commands (benchmarks/gpu_first_command.sh) rehearsed on the CPU as its image
# runs them (benchmarks/rehearse_gpu.sh): Python 3.12, torch 2.11, the site tarball, no network.
# What would come back lands in runs/rehearse-gpu/.
rehearse-gpu: setup
	MATRIX_ARGS="--lengths 64 --batches 2 --ranks 8 --steps 4" BUDGET=900 \
		bash benchmarks/rehearse_gpu.sh matrix runs/rehearse-gpu/matrix
	BUDGET=1500 bash benchmarks/rehearse_gpu.sh tests runs/rehearse-gpu/tests

# The figures the docs quote from a run (the demo, the plans, the recipe table, an export and an eval
# of the demo's run) rerun into README.md and docs/ between marker comments (benchmarks/docs_figures.py);
# tests/test_docs.py fails when a quoted plan no longer matches.
docs: setup
	$(PY) benchmarks/docs_figures.py

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) runs

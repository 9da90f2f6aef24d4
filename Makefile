# Two entry points: `make demo` and `make test`. Both create the environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; GPU users: `make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo demo-sft test lint format install install-dev install-eval bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# lmms-eval without its dependency tree: a plain install pulls a CUDA torch and a torchvision
# that breaks `import transformers` here. These are the packages it imports at run time.
$(VENV)/.installed-eval: $(VENV)/.installed-dev
	$(BIN)/pip install -q --no-deps lmms-eval==0.7.3 accelerate==1.15.0 psutil loguru pytz
	$(BIN)/pip install -q datasets sacrebleu tenacity evaluate pytablewriter "filelock<4"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-eval: $(VENV)/.installed-eval

# The chat page's test drives Debian's chromium through its chromedriver (CI runs as root);
# it fails, not skips, without them.
$(VENV)/.installed-browser: $(BIN)/python
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }
	touch $@

demo: $(VENV)/.installed
	$(BIN)/mm1 demo

# The demo, then its SFT stage (about 21 minutes more; reuses a finished runs/demo).
demo-sft: $(VENV)/.installed
	$(BIN)/mm1 demo --sft

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# One process per core of a 2-core machine; each test file stays in one process (its fixtures
# are built once). `make test TEST_WORKERS=0` runs the suite in this process. The sources are
# compiled first: an editable install leaves that to the first import, which
# PYTHONDONTWRITEBYTECODE turns off, and the tests start mm1 in hundreds of processes.
TEST_WORKERS ?= 2
test: lint $(VENV)/.installed-eval $(VENV)/.installed-browser
	$(BIN)/python -m compileall -q src >/dev/null
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.run_cpu

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

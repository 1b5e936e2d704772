# The two README commands (`make demo`, `make test`) plus benchmarks. Each target installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/loopdlm

.PHONY: install demo test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev,eval,hf,plot]'
	touch $@

install: $(VENV)/.installed

# Main job: prepare Shakespeare, train the tiny-cpu LoopMDM, report validation NELBO at several S, print samples.
demo: install
	$(CLI) train --config tiny-cpu
	$(CLI) eval --checkpoint runs/tiny-cpu --loops 1 2 4 8 12
	$(CLI) sample --checkpoint runs/tiny-cpu --prompt "ROMEO:" --prompt "KING HENRY:" --num-samples 1 --steps 64

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/bench_train.py

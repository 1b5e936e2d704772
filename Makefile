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

# Main job: train the `demo` LoopMDM on Shakespeare (BPE), validation NELBO at several S with paired standard
# errors, samples and the share of their words that are words of the plays. Re-running resumes or reuses the run.
demo: install
	$(CLI) train --config demo
	$(CLI) eval --checkpoint runs/demo --loops 1 2 4 8 --batches 32
	$(CLI) sample --checkpoint runs/demo --prompt "ROMEO:" --prompt "KING HENRY:" --num-samples 2 \
		--out runs/demo/samples.json
	$(PY) bench/sample_words.py runs/demo/samples.json --checkpoint runs/demo
	@echo
	@echo "Done. The run (checkpoints, metrics.jsonl, samples.json) is in runs/demo. Next:"
	@echo "  $(CLI) sample --checkpoint runs/demo --prompt 'JULIET:' --loops 8      # more samples"
	@echo "  $(CLI) sample --checkpoint runs/demo --sampler wino --html decode.html  # watch a decode"
	@echo "  $(CLI) eval --checkpoint runs/demo --loops 1 4 8 16                     # S beyond training"

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/bench_train.py

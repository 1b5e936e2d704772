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

# Main job. (1) Train the `demo` LoopMDM on Shakespeare (BPE), report the validation NELBO in bits/char at several S,
# print samples and the share of their words that are words of the plays. (2) Fine-tune the sudoku4 LoopMDM, a
# depth-bound task where looping shows within minutes: NELBO and solve rate against S. Re-running resumes or reuses.
demo: install
	$(CLI) train --config demo
	$(CLI) eval --checkpoint runs/demo --loops 1 4 --batches 20
	$(CLI) sample --checkpoint runs/demo --prompt "ROMEO:" --prompt "KING HENRY:" --num-samples 2 \
		--out runs/demo/samples.json
	$(PY) bench/sample_words.py runs/demo/samples.json --checkpoint runs/demo
	$(CLI) finetune --task sudoku4 --config sudoku4-tiny train.steps=600 train.out_dir=runs/demo-sudoku4
	$(CLI) eval --checkpoint runs/demo-sudoku4 --loops 1 2 4 8 --batches 8 --batch-size 64
	$(CLI) eval-task --checkpoint runs/demo-sudoku4 --loops 1 2 4 8 --steps 4 --n 256
	@echo
	@echo "Done. Runs: runs/demo (Shakespeare: checkpoints/, metrics.jsonl, samples.json) and runs/demo-sudoku4. Next:"
	@echo "  $(CLI) sample --checkpoint runs/demo --prompt 'JULIET:' --loops 8          # more samples"
	@echo "  $(CLI) sample --checkpoint runs/demo --sampler wino --html decode.html      # watch a decode"
	@echo "  $(CLI) eval-task --checkpoint runs/demo-sudoku4 --loops 1 4 8 16 --steps 16  # S beyond training"

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/bench_train.py

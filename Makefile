# Two commands do all set-up: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: test demo install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/lussray synth --out $(DEMO)/imagenet-s --dataset synthetic-demo
	$(BIN)/lussray prepare --src $(DEMO)/imagenet-s --out $(DEMO)/shards --dataset synthetic-demo
	$(BIN)/lussray run --dataset synthetic-demo --data $(DEMO)/shards --run $(DEMO)/run --baselines --crf

clean:
	rm -rf $(VENV) $(DEMO)

